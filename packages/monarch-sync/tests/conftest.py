import sys
from pathlib import Path

# Tests import their shared helpers as ``sync_helpers`` (pytest runs in importlib mode).
sys.path.insert(0, str(Path(__file__).parent))

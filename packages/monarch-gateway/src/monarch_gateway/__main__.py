import sys

from monarch_gateway.cli import main

sys.exit(main())

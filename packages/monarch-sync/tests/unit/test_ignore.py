from pathlib import Path

from monarch_sync.ignore import IgnoreRules, parse_rules


def rules(text: str) -> IgnoreRules:
    return IgnoreRules(parse_rules(text))


def test_basename_and_anchored_patterns() -> None:
    r = rules("*.pyc\n/build\ndocs/*.md\n")
    assert r.ignored("a/b/x.pyc", False)
    assert r.ignored("build", True)
    assert not r.ignored("src/build", True)
    assert r.ignored("docs/a.md", False)
    assert not r.ignored("docs/sub/a.md", False)


def test_negation_and_dir_only() -> None:
    r = rules("*.log\n!keep.log\ncache/\n")
    assert r.ignored("x.log", False)
    assert not r.ignored("keep.log", False)
    assert r.ignored("a/cache", True)
    assert not r.ignored("a/cache", False)


def test_double_star() -> None:
    r = rules("**/gen/**\nlogs/**/*.txt\n")
    assert r.ignored("a/gen/x", False)
    assert r.ignored("logs/a/b/c.txt", False)
    assert r.ignored("logs/c.txt", False)


def test_nested_rule_files_scope_to_their_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".syncignore").write_text("*.tmp\n")
    top = IgnoreRules().load_folder(tmp_path, "")
    sub = top.load_folder(tmp_path, "sub")
    assert sub.ignored("sub/a.tmp", False)
    assert not top.ignored("a.tmp", False)
    assert top.ignored(".git", True)

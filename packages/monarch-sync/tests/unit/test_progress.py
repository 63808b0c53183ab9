import io

from monarch_sync.progress import LineProgress, Progress, TerminalProgress, default_progress


def test_terminal_progress_draws_a_bar_and_ends_the_line() -> None:
    out = io.StringIO()
    bar = TerminalProgress(out, width=10)
    bar(Progress(500, 1000, 1, 0, 4))
    bar(Progress(1000, 1000, 3, 1, 4, final=True))
    text = out.getvalue()
    assert text.startswith("\r[#####-----] 500 B/1.0 KB  nodes 1/4")
    assert "[##########]" in text and "1 failed" in text
    assert text.endswith("\n")


def test_line_progress_rate_limits_but_always_prints_the_last_line() -> None:
    out = io.StringIO()
    lines = LineProgress(out, interval=3600)
    for sent in range(0, 100, 10):
        lines(Progress(sent, 100, 0, 0, 2))
    lines(Progress(100, 100, 2, 0, 2, final=True))
    got = out.getvalue().splitlines()
    assert len(got) == 2
    assert got[-1] == "sync: sent 100 B of 100 B, nodes done 2/2, failed 0"


def test_plain_lines_when_not_a_terminal() -> None:
    assert isinstance(default_progress(io.StringIO()), LineProgress)

"""Routing captured worker output to sessions: pure, no processes."""

from monarch_gateway.output import OutputRouter, new_tag, tag_of

A, B = "o0123456789ab", "off0000000000"


def line(tag: str, text: str) -> str:
    return f"[vm procs_{tag}-1<uid>@procs_{tag}-1<uid>.tcp://127.0.0.2:1] [1] {text}\n"


def test_lines_go_to_the_session_whose_mesh_wrote_them_without_its_tag():
    router = OutputRouter()
    runs = router.feed("stdout", line(A, "one") + line(A, "two") + line(B, "three"))
    assert [tag for tag, _ in runs] == [A, B]
    assert runs[0][1].count("one") == 1 and "two" in runs[0][1] and A not in runs[0][1]
    assert runs[0][1].startswith("[vm procs-1<uid>@procs-1<uid>.tcp://127.0.0.2:1]")


def test_the_gateways_own_output_goes_to_nobody():
    router = OutputRouter()
    text = (
        f"Traceback (most recent call last):\n  File x\n[gateway] {A}-1 noise\nplain {line(A, 'x')}"
    )
    assert router.feed("stderr", text) == []


def test_a_line_split_across_reads_is_routed_once_whole():
    router = OutputRouter()
    whole = line(A, "split")
    assert router.feed("stdout", whole[:20]) == []
    assert router.feed("stdout", whole[20:]) == [(A, whole.replace(f"_{A}", ""))]


def test_tags_are_distinct_and_recognized():
    tags = {new_tag() for _ in range(100)}
    assert len(tags) == 100
    assert all(tag_of(line(t, "x")) == t for t in tags)

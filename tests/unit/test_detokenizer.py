from deployments.engine.detokenizer import StopStringTextStream


def feed(stream: StopStringTextStream, pieces: list[str]) -> str:
    text, out = "", []
    for piece in pieces:
        text += piece
        out.append(stream.update(text))
    return "".join(out)


def test_partial_stop_strings_are_held_back_then_released():
    stream = StopStringTextStream(["END"])
    assert stream.update("abc E") == "abc "
    assert stream.update("abc EN") == ""
    assert stream.update("abc ENx") == "ENx"
    assert not stream.stopped


def test_stop_string_split_across_tokens_is_cut():
    stream = StopStringTextStream(["\n\n"])
    assert feed(stream, ["Paris", ".", "\n", "\n", "More"]) == "Paris."
    assert stream.stopped


def test_incomplete_utf8_is_not_emitted_until_complete():
    stream = StopStringTextStream([])
    assert stream.update("caf\ufffd") == "caf"
    assert stream.update("café") == "é"


def test_final_releases_everything_held():
    stream = StopStringTextStream(["STOP"])
    assert stream.update("go ST") == "go "
    assert stream.update("go ST", final=True) == "ST"

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


def test_stop_strings_are_not_looked_for_before_min_tokens_and_never_count_later():
    stream = StopStringTextStream(["ab"])
    assert stream.update("xab", find_stops=False) == "xab"
    assert stream.update("xabxa", find_stops=False) == "x"  # "a" may start a stop
    assert not stream.stopped
    assert stream.update("xabxab") == ""  # the earlier "ab" is text, the one ending now is not
    assert stream.stopped


def test_a_stop_string_completed_once_they_count_is_cut_where_it_began():
    stream = StopStringTextStream(["Paris"])
    assert stream.update("It is Par", find_stops=False) == "It is "
    assert stream.update("It is Paris!") == ""
    assert stream.stopped


def test_a_stop_string_held_back_inside_a_longer_ones_start_still_never_counts_later():
    stream = StopStringTextStream(["bc", "abcd"])
    assert stream.update("xabc", find_stops=False) == "x"  # "abc" may grow into "abcd"
    assert stream.update("xabcz") == "abcz"  # its "bc" came before min_tokens
    assert not stream.stopped

"""Text as tokens arrive: the pieces add up to the whole decode (multi-byte characters wait for
their last byte), a stop string ends the text before it even when it spans tokens, and text that
might begin a stop string is held back until it cannot. SmolLM2's real tokenizer; < 1 s."""

from qlora_engine.serve.detokenize import TextStream

TEXT = "Ostrevane is the capital of Quenlar — café, naïve, 東京 and 🙂 too.\nNext line: END here"


def feed(tok, text, stop=None):
    stream = TextStream(tok, stop)
    pieces = [stream.add(t) for t in tok(text, add_special_tokens=False).input_ids]
    pieces.append(stream.finish())
    return stream, pieces


def test_pieces_add_up_to_the_decoded_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    stream, pieces = feed(tok, TEXT)
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in p for p in pieces)  # the emoji and CJK bytes were not sent half-made
    assert len([p for p in pieces if p]) > 10 and not stream.stopped


def test_stop_strings_cut_the_text_and_partial_matches_wait(smollm2_tokenizer):
    tok = smollm2_tokenizer
    stream, pieces = feed(tok, TEXT, stop=["END", "never appears"])
    assert stream.stopped and "".join(pieces) == TEXT[: TEXT.index("END")]
    stream, pieces = feed(tok, TEXT, stop=["Quen"])  # "Quenlar" spans tokens; the match ends mid-token
    assert "".join(pieces) == "Ostrevane is the capital of "
    # "Next line:" is held while it could still become the stop string "Next line: X", then released
    stream, out, held = TextStream(tok, ["Next line: X"]), "", 0
    for t in tok(TEXT, add_special_tokens=False).input_ids:
        out += stream.add(t)
        if stream.text.endswith(("Next", "Next line", "Next line:")):
            assert "Next" not in out
            held += 1
    assert held >= 2 and out + stream.finish() == TEXT and not stream.stopped

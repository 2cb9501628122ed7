"""The record validator: every bad record reported with its reason, good ones accepted, no crash."""

import io
import json
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from llava_jax.data import sources, validate


def _bomb_png(w, h):
    """A tiny PNG whose header claims w x h pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _conv(q="<image>\nWhat is it?", a="A red circle."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "images"
    (r / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 30), (200, 0, 0)).save(r / "good.jpg")
    Image.new("RGBA", (16, 16), (0, 0, 200, 128)).save(r / "sub" / "rgba.png")
    (r / "empty.jpg").write_bytes(b"")
    (r / "text.jpg").write_bytes(b"hello, I am not a picture")
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), (1, 2, 3)).save(buf, "JPEG")
    (r / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    (r / "huge.png").write_bytes(_bomb_png(60000, 60000))
    (tmp_path / "outside.jpg").write_bytes((r / "good.jpg").read_bytes())
    return r


GOOD = [
    {"id": "g1", "image": "good.jpg", "conversations": _conv()},
    {"id": "g2", "image": "sub/rgba.png", "conversations": _conv("What is it?\n<image>")},
    {"id": "g3", "conversations": _conv("Tell me a joke.", "No.")},
    {"id": "g4", "image": "good.jpg", "conversations": _conv() + _conv("And the size?", "Small.")},
]
BAD = [
    ({"id": "b1", "image": "nope.jpg", "conversations": _conv()}, "missing_image_file"),
    ({"id": "b2", "image": "text.jpg", "conversations": _conv()}, "undecodable_image"),
    ({"id": "b3", "image": "truncated.jpg", "conversations": _conv()}, "undecodable_image"),
    ({"id": "b4", "image": "empty.jpg", "conversations": _conv()}, "empty_image"),
    ({"id": "b5", "image": "huge.png", "conversations": _conv()}, "decompression_bomb"),
    ({"id": "b6", "image": "good.jpg", "conversations": [{"from": "alien", "value": "<image>"}]}, "unknown_role"),
    ({"id": "b7", "image": "good.jpg", "conversations": list(reversed(_conv()))}, "roles_out_of_order"),
    ({"id": "b8", "image": "good.jpg", "conversations": []}, "no_turns"),
    ({"id": "b9", "image": "good.jpg"}, "no_turns"),
    ({"id": "b10", "image": "good.jpg", "conversations": _conv(a="")}, "empty_answer"),
    ({"id": "b11", "image": "good.jpg", "conversations": _conv(q="What is it?")}, "image_mark_missing"),
    ({"id": "b12", "image": "good.jpg", "conversations": _conv(q="<image><image> hi")}, "multiple_image_marks"),
    ({"id": "b13", "conversations": _conv()}, "image_mark_without_image"),
    ({"id": "b14", "image": "good.jpg", "conversations": _conv(q="<image>\n" + "word " * 3000)},
     "first_answer_beyond_max_length"),
    ({"id": "b15", "image": "/etc/passwd", "conversations": _conv()}, "absolute_image_path"),
    ({"id": "b16", "image": "../outside.jpg", "conversations": _conv()}, "image_path_escapes_root"),
    ({"id": "b17", "image": 7, "conversations": _conv()}, "bad_image_field"),
    ({"id": "b18", "image": "good.jpg", "conversations": _conv() + [{"from": "human", "value": "And?"}]},
     "roles_out_of_order"),
    ({"id": "b19", "image": "good.jpg", "conversations": [{"from": "gpt", "value": "<image>\nhi"},
                                                          {"from": "gpt", "value": "x"}]}, "roles_out_of_order"),
]


def _write_jsonl(path, records, extra_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")


def test_every_bad_record_reported_with_its_reason(root, tmp_path):
    data = tmp_path / "data.jsonl"
    _write_jsonl(data, GOOD + [r for r, _ in BAD], [b'{"id": "broken", ', b'{"id": "\xff\xfe"}', b"[1, 2]"])
    records = sources.load_records(data)
    report = validate.validate_records(records, [root], length=validate.LengthCheck(max_length=2048,
                                                                                   num_image_tokens=576))
    assert report.total == len(GOOD) + len(BAD) + 3
    got = {e["index"]: e["reason"] for e in report.bad}
    assert report.ok == len(GOOD), sorted(got.items())
    for k, (_, reason) in enumerate(BAD):
        assert got[len(GOOD) + k] == reason, BAD[k][0]["id"]
    n = len(GOOD) + len(BAD)
    assert [got[n], got[n + 1], got[n + 2]] == ["invalid_json", "not_utf8", "record_not_an_object"]
    assert "internal_error" not in report.errors


def test_cli_json_and_exit_status(root, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    cmd = [sys.executable, "-m", "llava_jax.data.validate", "--data", str(good), "--image-root", str(root), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) | {"examples": {}, "bad": []} == {
        "total": 4, "ok": 4, "errors": {}, "examples": {}, "bad": []}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(GOOD[:1] + [BAD[0][0], BAD[5][0]]))
    out = subprocess.run(cmd[:4] + [str(bad)] + cmd[5:], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["total"] == 3 and result["ok"] == 1
    assert result["errors"] == {"missing_image_file": 1, "unknown_role": 1}
    assert result["examples"]["unknown_role"][0]["id"] == "b6"


def test_broken_json_array_is_a_file_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1}, {"id": ')
    with pytest.raises(sources.DataFileError):
        sources.load_records(bad)
    assert validate.main(["--data", str(bad), "--json"]) == 1


def test_non_utf8_inside_a_json_array_is_reported_per_record(tmp_path, root):
    data = tmp_path / "a.json"
    data.write_bytes(b'[{"id": "x", "conversations": [{"from": "human", "value": "caf\xe9"}, '
                     b'{"from": "gpt", "value": "ok"}]}, ' + json.dumps(GOOD[2]).encode() + b"]")
    report = validate.validate_records(sources.load_records(data), [root])
    assert report.ok == 1 and dict(report.errors) == {"not_utf8": 1}


def test_exact_length_check_with_tokenizer(root):
    from llava_jax.tiny import build_tokenizer

    tok = build_tokenizer(["What is it? A red circle."], vocab_size=200)
    length = validate.LengthCheck(max_length=40, num_image_tokens=30, tokenizer=tok, template="plain",
                                  image_token_id=tok.convert_tokens_to_ids("<image>"))
    validate.check_record(GOOD[0], [root], length=length)
    with pytest.raises(Exception) as info:
        validate.check_record(GOOD[0], [root], length=validate.LengthCheck(
            max_length=31, num_image_tokens=30, tokenizer=tok, template="plain",
            image_token_id=tok.convert_tokens_to_ids("<image>")))
    assert validate.reason_of(info.value) == "first_answer_beyond_max_length"

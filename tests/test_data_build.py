"""`python -m llava_jax.data.build`: ArrayRecord shards readable without TensorFlow, bad records left out."""

import json
import subprocess
import sys

from PIL import Image

from llava_jax.data import sources


def test_build_cli_writes_readable_shards_and_skips_bad_records(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    recs = []
    for i in range(5):
        Image.new("RGB", (8 + i, 9), (i * 40, 0, 0)).save(root / f"{i}.png")
        recs.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": f"shade {i}"}]})
    recs.insert(2, {"id": "missing", "image": "nope.png", "conversations": recs[0]["conversations"]})
    recs.append({"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
    data = tmp_path / "d.json"
    data.write_text(json.dumps(recs))
    cmd = [sys.executable, "-m", "llava_jax.data.build", "--data", str(data), "--image-root", str(root),
           "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["written"] == 6 and result["skipped"] == {"missing_image_file": 1}
    src = sources.ArrayRecordSource(tmp_path / "out")
    assert [src[i]["record"]["id"] for i in range(len(src))] == ["r0", "r1", "r2", "r3", "r4", "text"]
    assert src[1]["image_bytes"] == (root / "1.png").read_bytes()
    assert src[5]["image_bytes"] is None

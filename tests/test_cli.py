import json
import subprocess
import sys

from elastic_core.model import load_checkpoint, load_config
from elastic_core.profile import measure_profile


def test_profile_cli_prints_the_documented_shape(checkpoint_dir):
    out = subprocess.run([sys.executable, "-m", "elastic_core.cli", "profile", "--checkpoint", str(checkpoint_dir),
                          "--batch", "2", "--seq", "16", "--repeats", "2", "--json"],
                         capture_output=True, text=True, check=True, timeout=300)
    doc = json.loads(out.stdout)
    assert doc["batch"] == 2 and doc["seq"] == 16 and doc["device"].startswith("cpu")
    assert list(doc["sublms"]) == load_config(checkpoint_dir).sublm_names  # the precision variants too
    assert all(v["ms"] > 0 for v in doc["sublms"].values())


def test_profile_table_feeds_the_schedule(checkpoint_dir, tmp_path):
    from elastic_core.profile import LatencyProfile

    profile = measure_profile(load_checkpoint(checkpoint_dir), batches=(1, 4), seqs=(8, 16), repeats=1,
                              progress=False)
    profile.save(tmp_path / "profile.json")
    loaded = LatencyProfile.load(tmp_path / "profile.json")
    declared = load_config(checkpoint_dir).sublm_names
    assert loaded.sublms == declared and len(loaded.entries) == len(declared) * 2 * 2
    assert loaded.predict_ms("w100", 2, 12) > 0

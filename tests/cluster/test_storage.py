import pytest

from cluster.storage import check_location, filesystem, join


@pytest.mark.parametrize("loc", ["runs/x", "/abs/path", "s3://bucket/prefix", "file:///tmp/x", "demo:train"])
def test_accepted_locations(loc):
    assert check_location(loc) == loc


@pytest.mark.parametrize("loc, msg", [("", "non-empty"), ("gs://b/x", "unsupported scheme"), ("s3://", "needs a bucket")])
def test_rejected_locations(loc, msg):
    with pytest.raises(ValueError, match=msg):
        check_location(loc)


def test_join():
    assert join("s3://b/runs/", "demo", "/gen") == "s3://b/runs/demo/gen"
    assert join("runs", "demo") == "runs/demo"


def test_s3_filesystem_uses_endpoint_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = filesystem("s3://bucket/key")
    assert path == "bucket/key"
    assert type(fs).__name__ == "S3FileSystem"


@pytest.mark.slow
def test_localize_refetches_objects_replaced_at_the_same_uri(s3_server, tmp_path):
    from pathlib import Path

    from cluster.storage import localize

    s3_server.create_bucket(Bucket="localize")
    s3_server.put_object(Bucket="localize", Key="model/weights.bin", Body=b"old")
    first = Path(localize("s3://localize/model", cache_root=str(tmp_path)))
    assert (first / "weights.bin").read_bytes() == b"old"
    assert localize("s3://localize/model", cache_root=str(tmp_path)) == str(first)  # unchanged: cached
    s3_server.put_object(Bucket="localize", Key="model/weights.bin", Body=b"newer")
    second = Path(localize("s3://localize/model", cache_root=str(tmp_path)))
    assert (second / "weights.bin").read_bytes() == b"newer"


def test_localize_tokenizer_only_leaves_the_weights_on_s3(s3_server, tmp_path):
    """A process that only tokenizes (the generation driver, a stage actor) copies no weights."""
    from pathlib import Path

    from cluster.storage import localize

    s3_server.create_bucket(Bucket="tokonly")
    for key, body in (("m/model.safetensors", b"w" * 64), ("m/tokenizer.json", b"{}"), ("m/sub/extra.txt", b"x")):
        s3_server.put_object(Bucket="tokonly", Key=key, Body=body)
    tok = Path(localize("s3://tokonly/m", cache_root=str(tmp_path), tokenizer_only=True))
    assert sorted(p.relative_to(tok).as_posix() for p in tok.rglob("*") if p.is_file()) == [
        ".complete", "sub/extra.txt", "tokenizer.json"]
    full = Path(localize("s3://tokonly/m", cache_root=str(tmp_path)))
    assert full != tok and (full / "model.safetensors").read_bytes() == b"w" * 64


def test_jsonl_rows_round_trip_with_sorted_keys_and_text_as_is(tmp_path):
    import json

    from cluster.storage import read_bytes, to_jsonl, write_jsonl

    rows = [{"step": 1, "loss": 2.5}, {"id": "r1", "messages": [{"role": "user", "content": "größer?"}]}]
    assert to_jsonl(rows).decode().splitlines()[0] == '{"loss": 2.5, "step": 1}'
    assert "größer" in to_jsonl(rows).decode()
    write_jsonl(str(tmp_path / "out" / "rows.jsonl"), rows)
    assert [json.loads(line) for line in read_bytes(str(tmp_path / "out" / "rows.jsonl")).splitlines()] == rows


def test_release_points_the_served_location_at_a_version_atomically(tmp_path, s3_server):
    from cluster.storage import RELEASE_FILE, follow_release, release

    served = str(tmp_path / "merged")
    assert follow_release(served) == served  # nothing released: the location itself (older layout)
    release(served, "/runs/x/versions/a", {"gate": {"passed": True}})
    release(served, "/runs/x/versions/b", {"gate": {"passed": True}})
    assert follow_release(served) == "/runs/x/versions/b"
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [RELEASE_FILE]  # no temp file left
    s3_server.create_bucket(Bucket="rel")
    release("s3://rel/run/merged", "s3://rel/run/versions/a", {})
    assert follow_release("s3://rel/run/merged") == "s3://rel/run/versions/a"

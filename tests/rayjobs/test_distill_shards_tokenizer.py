"""``rayjobs.distill.check_shards_tokenizer``: the driver refuses, before Ray starts, a student whose
tokenizer is not the one the shards' manifest records (tiny models with real saved tokenizers)."""

import pytest

from cluster.errors import ConfigError
from datasets_pipeline.shards import ShardStore
from datasets_pipeline.vocab_cache import tokenizer_records
from rayjobs.distill import check_shards_tokenizer


@pytest.fixture(scope="module")
def shards(tiny_pair, tmp_path_factory):
    """A shard location whose manifest records the cross-tokenizer pair (teacher -> student)."""
    data = str(tmp_path_factory.mktemp("shards"))
    ShardStore(data).write_manifest({"complete": True,
                                     "tokenizers": tokenizer_records(tiny_pair["teacher"], tiny_pair["student"])})
    return data


def test_the_shards_student_passes(tiny_pair, shards):
    check_shards_tokenizer(shards, tiny_pair["student"])


def test_another_student_tokenizer_is_refused_naming_both(tiny_pair, shards):
    recorded = ShardStore(shards).read_manifest()["tokenizers"]
    with pytest.raises(ConfigError) as e:
        check_shards_tokenizer(shards, tiny_pair["teacher"])
    message = str(e.value)
    for part in (shards, tiny_pair["student"], recorded["student"]["sha256"][:16], tiny_pair["teacher"],
                 recorded["teacher"]["sha256"][:16], "distillation.student"):
        assert part in message


def test_a_changed_teacher_tokenizer_is_refused(tiny_pair, shards):
    """Stored cross-tokenizer top-k is mapped through the recorded teacher tokenizer: it must still be that one."""
    check_shards_tokenizer(shards, tiny_pair["student"], tiny_pair["teacher"])
    with pytest.raises(ConfigError, match="regenerate the shards") as e:
        check_shards_tokenizer(shards, tiny_pair["student"], tiny_pair["student"])
    assert tiny_pair["student"] in str(e.value) and shards in str(e.value)


def test_shards_without_a_record_are_not_checked(tiny_pair, tmp_path):
    ShardStore(str(tmp_path)).write_manifest({"complete": True})
    check_shards_tokenizer(str(tmp_path), tiny_pair["teacher"])
    check_shards_tokenizer(str(tmp_path / "nothing-here"), tiny_pair["teacher"])

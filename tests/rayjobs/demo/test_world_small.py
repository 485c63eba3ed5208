import json
import subprocess
import sys

import pytest

from rayjobs.demo.world import DemoRecipe, ModelShape, resolve_model_ref


def test_recipe_hash_is_stable_and_sensitive():
    assert DemoRecipe().digest() == DemoRecipe().digest()
    assert DemoRecipe().digest() != DemoRecipe(lr=1e-3).digest()
    assert DemoRecipe().digest() != DemoRecipe.tiny().digest()
    assert len(DemoRecipe().digest()) == 16


def test_recipe_rejects_a_student_shaped_like_the_teacher():
    with pytest.raises(ValueError, match="differ"):
        DemoRecipe(student=DemoRecipe().teacher.model_copy(update={"max_position_embeddings": 64}))
    with pytest.raises(ValueError, match="context"):
        DemoRecipe(student=DemoRecipe().student.model_copy(update={"max_position_embeddings": 512}))
    with pytest.raises(ValueError):
        ModelShape(hidden_size=100, num_layers=1, num_heads=3, num_kv_heads=3, intermediate_size=64,
                   max_position_embeddings=64)


def test_non_demo_refs_pass_through(tmp_path):
    assert resolve_model_ref("s3://bucket/model", root=tmp_path) == "s3://bucket/model"
    assert resolve_model_ref("/models/x", root=tmp_path) == "/models/x"
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="demo:teacher"):
        resolve_model_ref("demo:nope", root=tmp_path)


def test_resolving_refs_needs_no_torch():
    code = "import sys, rayjobs.demo.world; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from rayjobs.demo.world import prepare

    lines = []
    built = prepare(tmp_path_factory.mktemp("cache"), DemoRecipe.tiny(), progress=lines.append)
    assert any("teacher held-out em" in line for line in lines)
    return built


@pytest.mark.slow
def test_models_and_tokenizers_load_with_transformers(world):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for path, arch in [
        (world.teacher, "Qwen2ForCausalLM"),
        (world.student, "LlamaForCausalLM"),
        (world.student_same_tokenizer, "LlamaForCausalLM"),
    ]:
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
            p.name for p in path.iterdir()
        }
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        assert type(model).__name__ == arch
        assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.bos_token_id == tokenizer.bos_token_id
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert config.vocab_size >= len(tokenizer)
        assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())


@pytest.mark.slow
def test_chat_template_renders_chatml(world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world.teacher)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 34?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode("<think>\n1+2\n</think>\n3<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\n1+2\n</think>\n3"


@pytest.mark.slow
def test_vocabularies_differ_but_both_split_digits(world):
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(world.teacher)
    student = AutoTokenizer.from_pretrained(world.student)
    same = AutoTokenizer.from_pretrained(world.student_same_tokenizer)
    assert len(teacher) != len(student)
    assert teacher.get_vocab() != student.get_vocab()
    assert teacher.get_vocab() == same.get_vocab()
    assert teacher.convert_tokens_to_ids("7") != student.convert_tokens_to_ids("7")
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert teacher.convert_tokens_to_ids(token) != student.convert_tokens_to_ids(token)
    assert teacher.pad_token_id != student.pad_token_id
    for tokenizer in (teacher, student):
        tokens = tokenizer.tokenize("What is 1234 + 98?")
        assert [t for t in tokens if t.isdigit()] == ["1", "2", "3", "4", "9", "8"]


@pytest.mark.slow
def test_students_are_smaller_and_shaped_differently(world):
    from transformers import AutoConfig

    teacher = AutoConfig.from_pretrained(world.teacher)
    for path in (world.student, world.student_same_tokenizer):
        student = AutoConfig.from_pretrained(path)
        assert student.hidden_size != teacher.hidden_size
        assert student.num_hidden_layers != teacher.num_hidden_layers
        assert student.num_attention_heads != teacher.num_attention_heads
        assert student.max_position_embeddings < teacher.max_position_embeddings
    params = world.info["params"]
    assert max(params["student"], params["student_same_tokenizer"]) <= params["teacher"] / 4


@pytest.mark.slow
def test_world_json_and_prompt_files(world):
    info = json.loads((world.root / "world.json").read_text())
    assert info["hash"] == DemoRecipe.tiny().digest() == world.root.name
    assert info["recipe"] == DemoRecipe.tiny().model_dump(mode="json")
    assert info["teacher_em"] == world.teacher_em and info["build_seconds"] > 0
    rows = [json.loads(line) for line in world.heldout_jsonl.read_text().splitlines()]
    assert len(rows) == DemoRecipe.tiny().n_heldout
    assert {"id", "messages", "answer"} <= set(rows[0])
    train_prompts = {r["messages"][-1]["content"] for r in map(json.loads, world.train_jsonl.read_text().splitlines())}
    assert not train_prompts & {r["messages"][-1]["content"] for r in rows}


@pytest.mark.slow
def test_cached_world_is_reused_and_refs_resolve(world):
    from rayjobs.demo.world import prepare

    cache = world.root.parent.parent
    again = prepare(cache, DemoRecipe.tiny(), progress=pytest.fail)
    assert again.teacher == world.teacher
    tiny = DemoRecipe.tiny()
    assert resolve_model_ref("demo:teacher", cache, tiny) == str(world.teacher)
    assert resolve_model_ref("demo:student-same-tokenizer", cache, tiny) == str(world.student_same_tokenizer)
    assert resolve_model_ref("demo:heldout", cache, tiny) == str(world.heldout_jsonl)


@pytest.mark.slow
def test_exact_match_reports_em_and_throughput(world):
    from rayjobs.demo.evaluate import exact_match

    result = exact_match(world.teacher, world.heldout_jsonl, limit=8, batch_size=4, max_new_tokens=8)
    assert result["n"] == 8 and 0.0 <= result["em"] <= 1.0 and result["tokens_per_s"] > 0


@pytest.mark.slow
def test_build_is_deterministic_and_interrupted_builds_are_redone(world, tmp_path):
    from rayjobs.demo.world import prepare

    recipe = DemoRecipe.tiny()
    interrupted = tmp_path / "demo" / recipe.digest()
    interrupted.mkdir(parents=True)
    (interrupted / "teacher").mkdir()
    rebuilt = prepare(tmp_path, recipe, progress=lambda line: None)
    assert (rebuilt.root / "world.json").exists()
    for name in ("teacher", "student", "student_same_tokenizer"):
        weights = "model.safetensors"
        assert (getattr(rebuilt, name) / weights).read_bytes() == (getattr(world, name) / weights).read_bytes()
    assert rebuilt.heldout_jsonl.read_text() == world.heldout_jsonl.read_text()

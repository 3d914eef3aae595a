"""Backbones beyond OpenAI's ViTs: RN50 / RN101, any open_clip MODEL:TAG from local caches only, each
backbone's own preprocessing and tokenizer, and which method runs on which family (refused before any
run, with why). The families run at test size: `tiny_rn` (ResNet) and `tiny_siglip` (timm ViT with
attention pooling, non-causal text)."""

import duckdb
import pytest
import torch
from PIL import Image

from harness.applicability import markdown
from harness.backbones import (
    Preprocess,
    build_architecture,
    capabilities,
    load_backbone,
    preprocess_of,
    refusal,
    split_name,
)
from harness.cli import run_cli
from harness.data.images import eval_view
from methods import REGISTRY

FROZEN_FEATURE = {"zero_shot", "tip_adapter", "tip_adapter_f", "taskres", "clip_adapter", "lp_pp", "clap", "gda"}
TEXT_PROMPTS = {"coop", "cocoop", "kgcoop", "prograd"}


@pytest.mark.parametrize("backbone,expected", [("tiny_rn", FROZEN_FEATURE | TEXT_PROMPTS),
                                              ("tiny_siglip", FROZEN_FEATURE | TEXT_PROMPTS | {"clip_lora", "block_lora", "two_sfs", "clip_svd"})])
def test_each_family_runs_exactly_what_it_declares(tmp_path, capsys, demo_root, backbone, expected):
    db = tmp_path / f"{backbone}.duckdb"
    assert run_cli(["run", "--suite", "demo", "-b", backbone, "--all-methods", "-d", "demo_colours", "--shots", "2", "--seeds", "1",
                    "--set", "epochs=4", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    with duckdb.connect(str(db), read_only=True) as con:
        runs = dict(con.execute("SELECT method, status FROM runs").fetchall())
    assert set(runs) == expected and set(runs.values()) == {"ok"}
    for name in set(REGISTRY) - expected:  # every other method is named with why, and nothing of it ran
        assert f"{name} cannot run on {backbone}" in " ".join(out.split())


def test_a_method_named_for_a_backbone_that_cannot_run_it_is_refused_before_any_run(tmp_path, capsys, demo_root):
    db = tmp_path / "r.duckdb"
    assert run_cli(["run", "--suite", "demo", "-b", "tiny_rn", "-m", "maple,coop", "-d", "demo_colours", "--db", str(db)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "maple cannot run on tiny_rn: it needs a ViT image tower" in err and "ResNet with attention pooling" in err
    assert "coop" not in err.split("maple")[0] and not db.exists()
    assert run_cli(["run", "--suite", "demo", "-b", "tiny_siglip", "-m", "prolip", "-d", "demo_colours", "--db", str(db)]) == 2
    assert "prolip cannot run on tiny_siglip" in " ".join(capsys.readouterr().err.split())


def test_lora_in_a_timm_image_tower_starts_at_clip_and_merges_exactly():
    """CLIP-LoRA's adapters on timm's fused qkv (tiny_siglip): the model is unchanged at start (B = 0);
    with trained-looking B the merged weights give the unmerged model's outputs."""
    from methods.lora import AdaptedLinear, adapted_copy, lora_factory, merge_adapters

    backbone = load_backbone("tiny_siglip")
    pixels, tokens = torch.rand(3, 3, 32, 32), backbone.tokenize(["a red star.", "blue"])
    model, params = adapted_copy(backbone.model, lora_factory(2, 1.0, 0.25))
    assert sum(p.numel() for p in params) == 3_072 and any(isinstance(m, AdaptedLinear) for m in model.modules())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), backbone.model.encode_image(pixels), rtol=0, atol=1e-6)
        for p in params:
            if p.shape[1] == 2:  # B [d_out, r]
                p.normal_(std=0.05)
        unmerged_image, unmerged_text = model.encode_image(pixels), model.encode_text(tokens)
        assert (unmerged_image - backbone.model.encode_image(pixels)).abs().max() > 1e-4  # the adapters act
        merge_adapters(model)
        torch.testing.assert_close(model.encode_image(pixels), unmerged_image, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), unmerged_text, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny_rn", "tiny_siglip"])
def test_prompts_enter_every_text_tower_exactly(name):
    """The prompt learners' path (token embeddings in, the tower's own mask, pooling and projection)
    equals open_clip's encode_text on CLIP's causal tower (truncated at EOT) and on a non-causal,
    last-token-pooled one with a biased projection (given the whole context)."""
    from harness.backbones import encode_token_embeddings, text_is_causal, text_tower

    backbone = load_backbone(name)
    model = backbone.model
    tokens = backbone.tokenize(["a photo of a red star.", "blue", "a long caption " * 5])
    eot = tokens.argmax(-1)
    assert text_is_causal(model) == (name != "tiny_siglip")
    given = tokens[:, : int(eot.max()) + 1] if text_is_causal(model) else tokens
    with torch.no_grad():
        ours = encode_token_embeddings(model, text_tower(model).token_embedding(given), eot)
        torch.testing.assert_close(ours, model.encode_text(tokens), rtol=0, atol=1e-5)


def test_open_clip_names_resolve_from_local_caches_only(tmp_path, capsys, monkeypatch, demo_root):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    monkeypatch.setenv("HOME", str(tmp_path))  # and an empty ~/.cache/clip
    args = ["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_colours", "--db", str(tmp_path / "x.duckdb")]
    assert run_cli([*args, "-b", "ViT-B-16-SigLIP2:webli"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "No weights for backbone ViT-B-16-SigLIP2:webli" in err and "never downloads" in err and "--weights PATH" in err
    assert run_cli([*args, "-b", "ViT-B-16-SigLIP2:nope"]) == 2
    assert "Tags of ViT-B-16-SigLIP2: webli" in " ".join(capsys.readouterr().err.split())
    assert run_cli([*args, "-b", "RN5O"]) == 2
    assert "Did you mean 'RN50'?" in capsys.readouterr().err
    assert run_cli([*args, "-b", "RN50"]) == 2  # a named OpenAI backbone without weights: the same clear refusal
    assert "No weights for backbone RN50" in " ".join(capsys.readouterr().err.split())
    assert split_name("RN50") == ("RN50-quickgelu", None) and split_name("EVA02-B-16:merged2b_s8b_b131k") == ("EVA02-B-16", "merged2b_s8b_b131k")


def test_preprocessing_and_tokenizer_come_from_the_backbone(demo_root):
    assert preprocess_of("ViT-B-16-SigLIP2:webli", 224) == Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash")
    assert preprocess_of("RN50", 224) == Preprocess(224)  # OpenAI's: CLIP's mean and std, shorter side + centre crop
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 16, 32))  # a blue left quarter
    cropped, squashed = eval_view(wide, 32), eval_view(wide, 32, "squash")
    assert cropped[2, 16, 0] < 128 and squashed[2, 16, 0] > 200  # the crop cuts the blue quarter off, the squash keeps it
    siglip = load_backbone("tiny_siglip")
    from test_coop import make_task

    task = make_task(siglip, "demo_colours", 1)
    torch.testing.assert_close(task.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)), torch.ones(1, 3, 2, 2))
    assert float(siglip.model.logit_bias) == -10.0 and siglip.embed_dim == 64


def test_rn50_is_openais_architecture():
    """OpenAI's RN50 has 102,007,137 parameters; its published tensor shapes."""
    model = build_architecture("RN50")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 102_007_137
    assert shapes["visual.conv1.weight"] == (32, 3, 3, 3) and shapes["visual.attnpool.positional_embedding"] == (50, 2048)
    assert shapes["visual.attnpool.c_proj.weight"] == (1024, 2048) and shapes["text_projection"] == (512, 1024)
    assert sum(p.numel() for p in build_architecture("RN101").parameters()) == 119_688_033


def test_real_size_trainable_counts_and_refusals(demo_root):
    """CoOp learns 16 x 512 = 8,192 on RN50 and on EVA-02 B/16 (its text tower in model.text); CLIP-LoRA
    184,320 on EVA-02 B/16 and 221,184 on SigLIP 2 B/16; 2SFS's LayerNorms 61,440 and CLIP-SVD's 101,376 singular values on EVA-02 B/16; RN50 refuses CLIP-LoRA, and all three MaPLe."""
    from test_coop import make_task

    from harness.backbones import Backbone

    rn50 = Backbone("RN50", build_architecture("RN50").eval().requires_grad_(False), 224, "random", torch.device("cpu"))
    coop = REGISTRY["coop"]()
    coop.build(make_task(rn50, "demo_shapes", 1))
    assert coop.trainable_parameters() == 8_192
    for name in ("RN50", "ViT-B-16-SigLIP2:webli", "EVA02-B-16:merged2b_s8b_b131k"):
        assert refusal(REGISTRY["maple"], name)
    assert "attention only in the final pooling" in refusal(REGISTRY["clip_lora"], "RN50")
    assert refusal(REGISTRY["clip_lora"], "EVA02-B-16:merged2b_s8b_b131k") is None
    assert refusal(REGISTRY["coop"], "ViT-B-16-SigLIP2:webli") is None  # any open_clip text tower takes CoOp's context
    assert "SigLIP-style" in refusal(REGISTRY["maple"], "ViT-B-16-SigLIP2:webli")
    eva = load_backbone_random("EVA02-B-16:merged2b_s8b_b131k")  # timm image tower, CLIP-like text tower in model.text
    coop = REGISTRY["coop"]()
    coop.build(make_task(eva, "demo_shapes", 1))
    assert coop.trainable_parameters() == 8_192
    from methods.lora import add_adapters, lora_factory

    # CLIP-LoRA (rank 2 on q, k, v of every block): EVA-02's separate q/k/v projections, 12 x 3 x 2 (768 + 768)
    # in the image tower and 12 x 3 x 2 (512 + 512) in the text tower, as on OpenAI's ViT-B/16
    from methods.two_sfs import layernorms

    # 2SFS's stage 1: norm1 / norm2 of every timm block and ln_1 / ln_2 of every text block, as on ViT-B/16
    assert sum(p.numel() for m in layernorms(eva.model) for p in m.parameters()) == 61_440
    from methods.clip_svd import singular_value_count

    # CLIP-SVD: every Linear of each timm block (q, k, v, proj, EVA's SwiGLU fc1_g, fc1_x, fc2: 7 x 768) and the text tower's 6 x 512
    assert singular_value_count(eva.model) == 12 * 7 * 768 + 12 * 6 * 512 == 101_376
    assert sum(p.numel() for p in add_adapters(eva.model, lora_factory())) == 184_320
    siglip = build_architecture("ViT-B-16-SigLIP2:webli")  # fused qkv, text width 768
    assert sum(p.numel() for p in add_adapters(siglip, lora_factory())) == 221_184
    assert capabilities("ViT-B-16") == {} and capabilities("ViT-B-16:dfn2b") == {}


def load_backbone_random(name):
    from harness.backbones import Backbone, preprocess_of, tokenizer_of

    model = build_architecture(name).eval().requires_grad_(False)
    return Backbone(name, model, 224, "random", torch.device("cpu"), preprocess_of(name, 224), tokenizer_of(name))


def test_the_readme_applicability_table_is_the_generated_one():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert markdown() in readme, "regenerate it: python -c 'from harness.applicability import markdown; print(markdown())'"


def test_rn50_published_rows_load_beside_ours():
    """Tip-Adapter's released RN50 numbers (exp.log): zero-shot and three methods at 1-16 shots, 11 datasets."""
    from harness.published import published_frame

    rn50 = published_frame()
    rn50 = rn50[rn50.backbone == "RN50"]
    assert sorted(rn50.method.unique()) == ["clip_adapter", "tip_adapter", "tip_adapter_f", "zero_shot"]
    assert rn50.dataset.nunique() == 11 and len(rn50) == 3 * 5 * 11 + 11
    cell = rn50.set_index(["method", "dataset", "shots"])["top1"]
    assert cell[("zero_shot", "imagenet", 0)] == 60.32 and cell[("tip_adapter_f", "imagenet", 16)] == 65.51

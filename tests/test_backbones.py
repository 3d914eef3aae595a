"""Backbones beyond OpenAI's ViTs: RN50 / RN101, any open_clip MODEL:TAG from local caches only, each
backbone's own preprocessing and tokenizer, and which method runs on which family (refused before any
run, with why). The families run at test size: `tiny_rn` (ResNet), `tiny_siglip` (timm ViT with
attention pooling, non-causal text) and `tiny_eva` (timm EVA with rotary positions, CLIP's text tower
apart, random weights); real-size architectures with random weights where the sizes matter."""

import functools

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


LORA_FAMILY = {"clip_lora", "block_lora", "clip_svd"}
VISION_PROMPTS = {"maple", "plot_pp", "promptsrc"}


@pytest.mark.parametrize("backbone,expected", [("tiny_rn", FROZEN_FEATURE | TEXT_PROMPTS | LORA_FAMILY),
                                              ("tiny_siglip", FROZEN_FEATURE | TEXT_PROMPTS | LORA_FAMILY | VISION_PROMPTS | {"two_sfs"}),
                                              ("tiny_eva", set(REGISTRY) - {"mmrl"})])
def test_each_family_runs_exactly_what_it_declares(tmp_path, capsys, demo_root, backbone, expected):
    db = tmp_path / f"{backbone}.duckdb"
    assert run_cli(["run", "--suite", "demo", "-b", backbone, "--all-methods", "-d", "demo_colours", "--shots", "2", "--seeds", "1",
                    "--set", "epochs=10", "--db", str(db)]) == 0
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


@pytest.mark.parametrize("name,count", [("tiny_siglip", 3_072), ("tiny_rn", 4_608)])
def test_lora_in_timm_and_resnet_towers_starts_at_clip_and_merges_exactly(name, count):
    """CLIP-LoRA's adapters on timm's fused qkv (tiny_siglip) and on a ResNet's attention pooling
    (tiny_rn; the pooling re-run with its projections as modules): the model is unchanged at start
    (B = 0); with trained-looking B the adapters act and the merged weights give the unmerged outputs."""
    from methods.lora import AdaptedAttentionPool, AdaptedLinear, adapted_copy, lora_factory, merge_adapters

    backbone = load_backbone(name)
    pixels, tokens = torch.rand(3, 3, 32, 32), backbone.tokenize(["a red star.", "blue"])
    model, params = adapted_copy(backbone.model, lora_factory(2, 1.0, 0.25))
    assert sum(p.numel() for p in params) == count and any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert isinstance(model.visual.attnpool, AdaptedAttentionPool) if name == "tiny_rn" else True
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), backbone.model.encode_image(pixels), rtol=0, atol=1e-5)
        for p in params:
            if p.shape[1] == 2:  # B [d_out, r]
                p.normal_(std=0.05)
        unmerged_image, unmerged_text = model.encode_image(pixels), model.encode_text(tokens)
        assert (unmerged_image - backbone.model.encode_image(pixels)).abs().max() > 1e-4  # the adapters act
        merge_adapters(model)
        torch.testing.assert_close(model.encode_image(pixels), unmerged_image, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), unmerged_text, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny_siglip", "EVA02-B-16:merged2b_s8b_b131k", "PE-Core-B-16:meta"])
def test_prompted_image_towers_equal_the_backbone_without_prompts(name):
    """The deep-prompt image tower (MaPLe, PLOT++, PromptSRC) equals the backbone's encode_image with no
    prompts: open_clip's ViT, timm's ViT with attention pooling (tiny_siglip), EVA-02 (rotary, class
    token) and PE-Core (rotary, attention pooling) at real size with random weights. With prompts the
    features change, and the prompt tokens carry no position (EVA's rotary table gives them the
    identity): swapping two of them leaves the features unchanged."""
    from methods.deep_prompts import vision_tower

    model = load_backbone(name).model if name.startswith("tiny") else random_architecture(name)
    size = 32 if name.startswith("tiny") else 224
    width = 64 if name.startswith("tiny") else 768
    pixels = torch.rand(2, 3, size, size) * 2 - 1
    torch.manual_seed(0)
    prompts, deep = torch.randn(1, 2, width), [torch.randn(1, 2, width)]
    with torch.no_grad():
        plain = model.encode_image(pixels)
        torch.testing.assert_close(vision_tower(model, pixels)[0], plain, rtol=1e-4, atol=1e-5 * plain.abs().max())
        prompted = vision_tower(model, pixels, prompts, deep)[0]
        assert (prompted - plain).norm() > 0.01 * plain.norm()  # (random real-size weights give tiny features)
        swapped = vision_tower(model, pixels, prompts.flip(1), [d.flip(1) for d in deep])[0]
        torch.testing.assert_close(swapped, prompted, rtol=1e-4, atol=1e-4 * plain.abs().max())


@pytest.mark.parametrize("name", ["tiny", "tiny_rn", "tiny_siglip", "tiny_eva"])
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


def test_learned_context_sits_where_the_tokenizer_puts_the_first_word(demo_root):
    """CoOp's context initialised from "a photo of a" reproduces the tower's own features of "a photo of
    a {class}." under CLIP's BPE (start token, context from position 1) and under a tokenizer that puts
    nothing before the text (as SigLIP's: context from position 0), so no class name loses a token."""
    import open_clip
    import torch.nn.functional as F
    from test_coop import make_task

    from methods.coop import PromptLearner

    def without_start_token(texts):
        tokens = open_clip.tokenize(texts)
        return torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)

    backbone = load_backbone("tiny_siglip")
    for tokenizer, start in ((None, 1), (without_start_token, 0)):
        backbone.tokenizer = tokenizer
        assert backbone.prompt_start == start
        task = make_task(backbone, "demo_colours", 1)
        learner = PromptLearner(task, 4, 0.02, "a photo of a")
        with torch.no_grad():
            expected = backbone.model.encode_text(backbone.tokenize([f"a photo of a {c}." for c in task.classnames]))
            torch.testing.assert_close(learner.text_features(task), F.normalize(expected, dim=-1), rtol=0, atol=1e-5)


def test_an_open_clip_model_loads_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """`-b PE-Core-T-16-384:meta` resolves to the checkpoint already in the Hugging Face cache (here one
    this test writes, random weights, laid out as huggingface_hub stores a download): the weights are
    that file's, its identity is the tag and the file's sha256, and the preprocessing and tokenizer
    (32 tokens) are the model's own."""
    import hashlib

    import huggingface_hub
    from safetensors.torch import save_file

    name = "PE-Core-T-16-384:meta"
    model = build_architecture(name)
    with torch.no_grad():
        model.logit_scale.fill_(1.5)  # a value random initialisation does not give
    snapshot = tmp_path / "hub" / "models--timm--PE-Core-T-16-384" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    checkpoint = snapshot / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))

    backbone = load_backbone(name)
    assert backbone.weights == "meta:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    assert float(backbone.model.logit_scale) == 1.5 and backbone.image_size == 384
    assert backbone.preprocess == preprocess_of(name, 384) and backbone.tokenize(["a photo"]).shape == (1, 32)


def test_rn50_runs_from_a_local_weights_file(tmp_path):
    """`harness run -b RN50 --weights FILE` end to end on CoOp-layout data: zero-shot and CoOp (its text
    prompts, the ResNet image tower at 224 px) run on the file's weights, whose identity is stored."""
    import hashlib

    from coop_layout import make_split_json

    make_split_json(tmp_path, per_split=(2, 1, 2))
    model = build_architecture("RN50")
    ckpt = tmp_path / "rn50.pt"
    torch.save(model.state_dict(), ckpt)
    db = tmp_path / "rn50.duckdb"
    assert run_cli(["run", "-m", "zero_shot,coop", "-d", "eurosat", "-b", "RN50", "--weights", str(ckpt), "--shots", "1", "--seeds", "1",
                    "--set", "epochs=2", "--data-root", str(tmp_path), "--db", str(db)]) == 0
    with duckdb.connect(str(db), read_only=True) as con:
        runs = con.execute("SELECT method, backbone, status, weights FROM runs ORDER BY method").fetchall()
    identity = "file:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    assert runs == [("coop", "RN50", "ok", identity), ("zero_shot", "RN50", "ok", identity)]


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


@functools.lru_cache(maxsize=2)
def random_architecture(name):
    """A real-size architecture with random weights, built once per test module (read-only use)."""
    return build_architecture(name).eval().requires_grad_(False)


@pytest.mark.parametrize("name", ["tiny", "EVA02-B-16:merged2b_s8b_b131k", "PE-Core-B-16:meta"])
def test_prolip_learns_the_projection_each_tower_applies(name):
    """ProLIP's W (and a timm Linear's frozen bias) applied to the pre-projection features gives the
    backbone's own image features: CLIP's visual.proj, EVA-02's and PE-Core's trunk heads. SigLIP's
    towers have no projection and are refused."""
    from harness.backbones import visual_projection, without_visual_projection

    model = load_backbone(name).model if name == "tiny" else random_architecture(name)
    size = 32 if name == "tiny" else 224
    pixels = torch.rand(2, 3, size, size) * 2 - 1
    weight, bias = visual_projection(model)
    with torch.no_grad():
        with without_visual_projection(model):
            pre = model.encode_image(pixels)
        plain = model.encode_image(pixels)
    assert pre.shape[-1] == weight.shape[0] and weight.shape[1] == plain.shape[-1] and (bias is None) == (name == "tiny")
    projected = pre @ weight + (bias if bias is not None else 0)
    torch.testing.assert_close(projected, plain, rtol=1e-4, atol=1e-5 * plain.abs().max())
    assert refusal(REGISTRY["prolip"], name) is None
    assert "no linear projection after its pooling" in refusal(REGISTRY["prolip"], "ViT-B-16-SigLIP2:webli")


def test_real_size_trainable_counts_and_refusals(demo_root):
    """Tested trainable-parameter counts at real size (random weights). CoOp: 16 x 512 = 8,192 on RN50
    and EVA-02 B/16, 16 x 768 = 12,288 on SigLIP 2 B/16. CLIP-LoRA: 184,320 on EVA-02 B/16, 221,184 on SigLIP 2 B/16, 98,304 on RN50 (its
    attention pooling and the text tower). MaPLe: 3,555,072 on EVA-02 B/16 (as on ViT-B/16), 5,329,152
    on SigLIP 2 B/16 (text width 768); refused on RN50. 2SFS's LayerNorms 61,440 and CLIP-SVD's 101,376
    singular values on EVA-02 B/16, CLIP-SVD 44,032 on RN50."""
    from test_coop import make_task

    from harness.backbones import Backbone
    from methods.clip_svd import singular_value_count
    from methods.lora import add_adapters, lora_factory
    from methods.two_sfs import layernorms

    rn50 = Backbone("RN50", build_architecture("RN50").eval().requires_grad_(False), 224, "random", torch.device("cpu"))
    coop = REGISTRY["coop"]()
    coop.build(make_task(rn50, "demo_shapes", 1))
    assert coop.trainable_parameters() == 8_192
    for name in ("ViT-B-16-SigLIP2:webli", "EVA02-B-16:merged2b_s8b_b131k", "RN50"):
        assert refusal(REGISTRY["clip_lora"], name) is None and refusal(REGISTRY["coop"], name) is None
    assert refusal(REGISTRY["maple"], "EVA02-B-16:merged2b_s8b_b131k") is None and refusal(REGISTRY["maple"], "ViT-B-16-SigLIP2:webli") is None
    assert "ResNet with attention pooling (no token sequence)" in refusal(REGISTRY["maple"], "RN50")
    assert "CLIP's own ViT image tower" in refusal(REGISTRY["mmrl"], "RN50") and "SigLIP-style" in refusal(REGISTRY["mmrl"], "ViT-B-16-SigLIP2:webli")
    # CLIP-LoRA on RN50: q, k, v of the attention pooling, 3 x 2 (2048 + 2048), and of the 12 text blocks, 12 x 3 x 2 (512 + 512)
    assert singular_value_count(rn50.model) == 3 * 2048 + 1024 + 12 * 6 * 512 == 44_032
    assert sum(p.numel() for p in add_adapters(rn50.model, lora_factory())) == 3 * 2 * 4096 + 12 * 3 * 2 * 1024 == 98_304

    eva = load_backbone_random("EVA02-B-16:merged2b_s8b_b131k")  # timm image tower, CLIP-like text tower in model.text
    for name, expected in (("coop", 8_192), ("maple", 3_555_072)):
        method = REGISTRY[name]()
        method.build(make_task(eva, "demo_shapes", 1))
        assert method.trainable_parameters() == expected
    # 2SFS's stage 1: norm1 / norm2 of every timm block and ln_1 / ln_2 of every text block, as on ViT-B/16
    assert sum(p.numel() for m in layernorms(eva.model) for p in m.parameters()) == 61_440
    # CLIP-SVD: every Linear of each timm block (q, k, v, proj, EVA's SwiGLU fc1_g, fc1_x, fc2: 7 x 768) and the text tower's 6 x 512
    assert singular_value_count(eva.model) == 12 * 7 * 768 + 12 * 6 * 512 == 101_376
    # CLIP-LoRA (rank 2 on q, k, v of every block): EVA-02's separate q/k/v projections, 12 x 3 x 2 (768 + 768)
    # in the image tower and 12 x 3 x 2 (512 + 512) in the text tower, as on OpenAI's ViT-B/16
    assert sum(p.numel() for p in add_adapters(eva.model, lora_factory())) == 184_320
    # SigLIP 2's own tokenizer needs `transformers` and its files; the count does not depend on it (CLIP's BPE stands in)
    siglip = Backbone("ViT-B-16-SigLIP2:webli", build_architecture("ViT-B-16-SigLIP2:webli").eval().requires_grad_(False), 224,
                      "random", torch.device("cpu"), preprocess_of("ViT-B-16-SigLIP2:webli", 224))
    siglip_task = make_task(siglip, "demo_shapes", 1)
    coop, maple = REGISTRY["coop"](), REGISTRY["maple"]()
    coop.build(siglip_task)
    maple.build(siglip_task)
    assert coop.trainable_parameters() == 16 * 768 == 12_288
    assert maple.trainable_parameters() == 2 * 768 + 768 * 768 + 768 + 8 * (2 * 768 + 768 * 768 + 768) == 5_329_152
    assert sum(p.numel() for p in add_adapters(siglip.model, lora_factory())) == 221_184  # fused qkv, text width 768
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

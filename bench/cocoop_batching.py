"""CoCoOp's per-image prompts: one batched text-encoder pass (methods/cocoop.py) against the
official per-image loop, on a real architecture with random weights.

A CoCoOp step on B images encodes B x C prompts. The official trainer loops over the images of a
batch and runs the text encoder once per image (C prompts); the harness stacks the B x C prompts
into passes of up to `prompt_chunk` prompts. Both give the same features (tests/test_prompt_learners.py);
this measures the time of a training step (forward + backward through the text encoder) and of
inference, and the peak memory of each way: CUDA's allocator peak on a GPU, the process's peak
resident memory on CPU (each way then runs in its own fresh process).

    python -m bench.cocoop_batching [--backbone ViT-B-16] [--classes 100] [--images 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import resource
import time


def measure(way: str, args: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from harness.backbones import build_architecture, encode_token_embeddings
    from methods.cocoop import conditional_text_features, meta_net

    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    model = build_architecture(args["backbone"]).to(device).eval().requires_grad_(False)
    import open_clip

    names = [f"class number {i}" for i in range(args["classes"])]
    tokens = open_clip.tokenize([f"a photo of a {n}." for n in names]).to(device)
    eot = tokens.argmax(-1)
    tokens = tokens[:, : int(eot.max()) + 1]
    with torch.no_grad():
        emb = model.token_embedding(tokens)
    width, dim = emb.shape[-1], model.text_projection.shape[1]

    class Prompts:  # the fixed parts, as methods.coop.PromptLearner holds them
        prefix, suffix, eot_index = emb[:, :1], emb[:, 5:], eot

    class TaskStub:  # what conditional_text_features reads of a Task
        backbone = type("B", (), {"model": model})

        @staticmethod
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    ctx = emb[0, 1:5].clone().requires_grad_(True)
    net = meta_net(dim, width, device)
    feats = F.normalize(torch.randn(args["images"], dim, device=device), dim=-1)

    def text(shift):
        if way == "batched":
            return conditional_text_features(TaskStub, Prompts, ctx, shift, args["chunk"])
        out = []
        for s in shift:  # the official loop: one text-encoder pass over all classes per image
            x = torch.cat([Prompts.prefix, (ctx + s).expand(len(names), -1, -1), Prompts.suffix], dim=1)
            with TaskStub.autocast():
                out.append(F.normalize(encode_token_embeddings(model, x, eot).float(), dim=-1))
        return torch.stack(out)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        logits = torch.einsum("bd,bcd->bc", feats, text(net(feats)))
        F.cross_entropy(logits, torch.zeros(len(feats), dtype=torch.long, device=device)).backward()

    def infer():
        with torch.no_grad():
            text(net(feats))

    out = {"way": way}
    for name, fn in (("train_step_s", train_step), ("inference_s", infer)):
        fn()  # warm-up
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args["repeats"]):
            fn()
        sync()
        out[name] = round((time.perf_counter() - t0) / args["repeats"], 4)
        if device.type == "cuda":
            out[name.replace("_s", "_peak_mb")] = round(torch.cuda.max_memory_allocated() / 2**20)
    if device.type != "cuda":
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _child(way, args, queue):
    queue.put(measure(way, args))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cocoop_batching", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--images", type=int, default=8, help="images per step (the official batch is 1)")
    p.add_argument("--chunk", type=int, default=4096, help="prompts per text-encoder pass (CoCoOp's prompt_chunk)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = vars(p.parse_args(argv))
    ctx = mp.get_context("spawn")
    results = []
    for way in ("per_image_loop", "batched"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(way, args, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
    loop, batched = results
    for r in results:
        print(r)
    summary = {**{k: args[k] for k in ("backbone", "classes", "images", "device")},
               "train_speedup": round(loop["train_step_s"] / batched["train_step_s"], 2),
               "inference_speedup": round(loop["inference_s"] / batched["inference_s"], 2), "ways": results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

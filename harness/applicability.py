"""Which method runs on which backbone family, from the methods' declarations (`Method.requires`)
and the backbones' configs (`harness.backbones.capabilities`): the table `harness list backbones`,
the README and the report show. One representative backbone stands for each family."""

from __future__ import annotations

from harness.backbones import CAPABILITIES, capabilities, refusal

FAMILIES = {
    "OpenAI ViT (B/16, B/32, L/14; tiny; open_clip ViT-B-16:dfn2b, :metaclip_fullcc)": "ViT-B-16",
    "OpenAI ResNet (RN50, RN101; tiny_rn)": "RN50",
    "EVA-02, PE-Core (timm image tower with a projection Linear, CLIP-style text)": "EVA02-B-16:merged2b_s8b_b131k",
    "SigLIP, SigLIP 2 (timm image tower without projection, non-causal text; tiny_siglip)": "ViT-B-16-SigLIP2:webli",
}


def rows() -> list[tuple[str, list[str]]]:
    """(method, per family: "yes" or what it lacks) for every registered method."""
    from methods import REGISTRY

    out = []
    for name, cls in REGISTRY.items():
        cells = []
        for backbone in FAMILIES.values():
            missing = capabilities(backbone)
            cells.append("yes" if refusal(cls, backbone) is None else "no: " + ", ".join(n for n in cls.requires if n in missing))
        out.append((name, cells))
    return out


def markdown() -> str:
    header = "| method | " + " | ".join(FAMILIES) + " |"
    lines = [header, "|---|" + "---|" * len(FAMILIES)]
    lines += [f"| `{m}` | " + " | ".join(cells) + " |" for m, cells in rows()]
    legend = "; ".join(f"`{k}`: {v}" for k, v in CAPABILITIES.items())
    return "\n".join(lines) + f"\n\nWhat a \"no\" lacks: {legend}."

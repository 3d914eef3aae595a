"""`harness report` renders what a reader needs: leaderboard, curves, gap table, marks, exports.

The database here is a FIXTURE: hand-made records written through harness.store.write_record,
shaped like real runs (numbers near the published ones plus seed noise). They test rendering and
aggregation, not any method's accuracy.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from datetime import datetime, timedelta
from html import unescape as html_unescape
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import run_cli
from harness.published import display_name, harness_backbone, load_published, published_frame
from harness.store import write_record

STANDARD = ["imagenet", "dtd", "eurosat"]
DEMO = ["demo_shapes", "demo_colours"]
T0 = datetime(2024, 6, 1, 12, 0)


def _record(method, dataset, backbone, shots, seed, top1, *, suite="standard", hparams=None, status="ok", error=None, params=0, n=0):
    config = {"method": method, "hparams": hparams or {}, "dataset": dataset, "suite": suite, "shots": shots, "seed": seed,
              "backbone": backbone, "precision": "bf16" if suite == "standard" else "fp32",
              "suite_overrides": {"epochs": 2} if suite == "demo" and method != "zero_shot" else {}}
    key = json.dumps(config, sort_keys=True)
    if method == "tip_adapter_f":  # as run_one stores them, outside the hash
        config = {**config, "selection": "few-shot val search over 4000 (alpha, beta) pairs", "source": "gaopengcuhk/Tip-Adapter@d0e2d6f8c5fe"}
    return {
        "config_hash": f"fx{abs(hash(key)) % 10**14:014d}", "run_id": f"fixture-{n}", "method": method, "dataset": dataset,
        "suite": suite, "backbone": backbone, "weights": "fixture-weights", "shots": shots, "seed": seed, "config": config,
        "status": status, "top1": top1 if status == "ok" else None, "n_test": 1000, "trainable_params": params,
        "train_seconds": 0.0 if shots == 0 else 3.0 * shots, "eval_seconds": 1.5, "peak_mem_mb": 900.0 + params / 1e4,
        "device": "cuda:NVIDIA H100" if suite == "standard" else "cpu", "precision": config["precision"],
        "harness_version": "0.1.0", "git_sha": "0123456789abcdef0123", "started_at": T0 + timedelta(minutes=n),
        "finished_at": T0 + timedelta(minutes=n, seconds=30), "error": error,
    }


def build_fixture_db(db: Path) -> None:
    """FIXTURE runs: ViT-B-16 on three standard datasets (published numbers exist) and the tiny demo grid."""
    pub = published_frame()
    pub = pub[pub.backbone == "ViT-B-16"].set_index(["method", "dataset", "shots"])["top1"]
    methods = {"coop": ({"n_ctx": 4, "ctx_init": "a photo of a"}, 2048, "coop_ctx4"), "tip_adapter_f": ({}, 16 * 512, "tip_adapter_f"),
               "clip_lora": ({"rank": 2}, 184_320, "clip_lora"), "block_lora": ({"rank": 2, "blocks": 4}, 46_080, "clip_lora")}
    n = 0
    for dataset in STANDARD:
        for seed in (1, 2, 3):
            n += 1
            write_record(db, _record("zero_shot", dataset, "ViT-B-16", 0, seed, pub[("zero_shot", dataset, 0)], n=n))
        for method, (hp, params, like) in methods.items():
            for shots in (1, 4, 16):
                for seed in (1, 2, 3):
                    n += 1
                    if method == "clip_lora" and dataset == "dtd" and shots == 16 and seed == 3:
                        continue  # a seed that never ran: the cell must be marked
                    top1 = pub[(like, dataset, shots)] + 0.4 * (seed - 2) + (0.3 if method == "block_lora" else -0.6)
                    if method == "block_lora" and dataset == "eurosat" and shots == 4 and seed == 2:
                        write_record(db, _record(method, dataset, "ViT-B-16", shots, seed, None, hparams=hp, status="failed",
                                                 error="DivergedError: loss became nan at step 17", params=params, n=n))
                        continue
                    write_record(db, _record(method, dataset, "ViT-B-16", shots, seed, top1, hparams=hp, params=params, n=n))
    for dataset in DEMO:
        for seed in (1, 2):
            n += 1
            write_record(db, _record("zero_shot", dataset, "tiny", 0, seed, 41.0 + len(dataset), suite="demo", n=n))
        for method, base in (("clip_lora", 55.0), ("tip_adapter", 50.0)):
            for shots in (1, 2, 4):
                for seed in (1, 2):
                    n += 1
                    if method == "tip_adapter" and shots == 4 and dataset == "demo_colours":
                        continue  # a dataset missing from the average: marked
                    write_record(db, _record(method, dataset, "tiny", shots, seed, base + 4 * shots ** 0.5 + seed,
                                             suite="demo", params=1000 if method == "clip_lora" else 0, n=n))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    db, out = root / "fixture.duckdb", root / "reports"
    build_fixture_db(db)
    assert run_cli(["report", "--db", str(db), "--out", str(out)]) == 0
    return db, out


def test_names_are_normalised_in_one_place():
    assert harness_backbone("ViT-B/16") == "ViT-B-16"
    assert display_name("coop", {"hparams": {"n_ctx": 4, "ctx_init": "a photo of a"}}) == "coop_ctx4"
    assert display_name("coop", {"hparams": {"n_ctx": 4, "ctx_init": ""}}) == "coop"  # not the paper's recipe
    assert display_name("coop", json.dumps({"hparams": {"n_ctx": 16}})) == "coop"
    assert display_name("clip_lora", {}) == "clip_lora"
    # Another few-shot protocol is another row, never averaged with CoOp's subsets.
    assert display_name("clip_lora", {"sampler": "coop"}) == "clip_lora"
    assert display_name("clip_lora", {"sampler": "clip_lora"}) == "clip_lora (clip_lora subsets)"
    assert display_name("tip_adapter", {"sampler": "files", "hparams": {"search_split": "full_val"}}) == (
        "tip_adapter (split files, full-val search)"
    )


def test_report_writes_nothing_and_published_numbers_come_from_the_csvs(rendered):
    db, _ = rendered
    before = db.read_bytes()
    assert run_cli(["report", "--db", str(db), "--out", str(db.parent / "again")]) == 0
    assert db.read_bytes() == before
    pub = published_frame()
    shipped = sorted((Path(__file__).parent.parent / "results/published").glob("published_*.csv"))
    assert len(pub) == sum(len(pd.read_csv(f)) for f in shipped)  # every shipped published CSV, read as shipped
    assert pub.source.nunique() == len({src for f in shipped for src in pd.read_csv(f).source})
    assert sorted(pub.backbone.unique()) == ["RN50", "ViT-B-16", "ViT-B-32", "ViT-L-14"]
    assert load_published(db) == load_published(db) == len(pub)  # what `harness run` does: idempotent


def test_report_files_and_content(rendered):
    _, out = rendered
    html = (out / "index.html").read_text()
    for name in ("index.html", "leaderboard.csv", "leaderboard.md", "leaderboard.tex"):
        assert (out / name).stat().st_size > 0
    assert 'class="board"' in html and "Leaderboard: average over datasets" in html
    assert html.count("<svg") >= 4  # curves and efficiency for two backbones
    assert "coop_ctx4" in html and '<td class="name">coop</td>' not in html
    assert "few-shot subsets (runs)" in html and "coop (before samplers were recorded)" in html
    assert "0-shot reference" in html
    selection = html[html.index('id="selection"'):]
    selection = selection[: selection.index("</table>")]
    assert "few-shot val search over 4000 (alpha, beta) pairs (27)" in selection  # 3 datasets x 3 shots x 3 seeds
    assert "not recorded (run from before selection was stored)" in selection
    assert "gaopengcuhk/Tip-Adapter@d0e2d6f8c5fe" in selection and "Tip-Adapter@d0e2d6f8c5fe (main.py" in html
    assert "Reproduction gap" in html and "CLIP-LoRA paper (arXiv 2405.18541v2)" in html
    assert "DivergedError: loss became nan at step 17" in html  # failed run listed
    assert "2/3 seeds" in html  # clip_lora dtd 16-shot and the failed block_lora run
    assert "1/2 datasets (missing: demo_colours)" in html
    assert "Low-Rank Few-Shot Adaptation" in html or "Radford" in html  # method notes from the registry
    assert "epochs" in html  # demo suite overrides
    assert "0123456789ab" in html and "cuda:NVIDIA H100" in html and "bf16" in html
    # Self-contained: nothing is fetched from elsewhere (xmlns URIs are names, not loads).
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "url(http" not in html and "@import" not in html


def test_leaderboard_marks_and_never_ranks_incomplete_cells(rendered):
    _, out = rendered
    board = pd.read_csv(out / "leaderboard.csv")
    cell = board[(board.backbone == "ViT-B-16") & (board.method == "clip_lora") & (board.shots == 16)].iloc[0]
    assert cell.n_seeds == 2 and cell.expected_seeds == 3 and cell.flag == "\u2020" and pd.isna(cell["rank"])
    cell = board[(board.backbone == "tiny") & (board.method == "tip_adapter") & (board.shots == 4)].iloc[0]
    assert cell.n_datasets == 1 and cell.missing_datasets == "demo_colours" and cell.flag == "\u2021" and pd.isna(cell["rank"])
    full = board[(board.backbone == "ViT-B-16") & (board.method == "coop_ctx4") & (board.shots == 4)].iloc[0]
    assert full.n_datasets == 3 and full.n_seeds == 3 and not isinstance(full.flag, str)
    assert board[(board.shots == 0)]["rank"].isna().all()  # zero-shot is a reference, not ranked
    md = (out / "leaderboard.md").read_text()
    assert "## ViT-B-16 (standard suite)" in md and "coop_ctx4" in md and "\u2020" in md


def test_gap_table_matches_published(rendered):
    from harness.report import aggregate, gap_table, load_runs

    db, _ = rendered
    gaps = gap_table(aggregate(*load_runs(db)))
    row = gaps[(gaps.method == "coop_ctx4") & (gaps.dataset == "dtd") & (gaps.shots == 4)].iloc[0]
    assert row.gap == pytest.approx(-0.6) and row.source.startswith("CLIP-LoRA paper")
    assert "average" not in set(gaps.dataset)  # 3 of 11 datasets: no average compared with the paper's
    assert "block_lora" not in set(gaps.method)  # no published numbers for it


def test_latex_fragment(rendered, tmp_path):
    _, out = rendered
    tex = (out / "leaderboard.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\bfseries" in tex and r"$^{\approx}$" in tex
    assert re.search(r"\\scriptsize \[\d+\.\d, \d+\.\d\]", tex)  # the 95 % interval of each entry
    assert r"coop\_ctx4" in tex and "coop_ctx4" not in tex.replace(r"coop\_ctx4", "")
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed: the .tex fragment was checked textually but not compiled")
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n\\input{" + str(out / "leaderboard.tex") + "}\n\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_report_without_database_is_a_usage_error(tmp_path, capsys):
    assert run_cli(["report", "--db", str(tmp_path / "none.duckdb"), "--out", str(tmp_path)]) == 2
    assert "No run database" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# Runs in the page after layout and leaves its findings in <pre id="probe">: page overflow, the rendered
# size of every plot's text, legend boxes against axes boxes, and each legend entry's colour.
PROBE = """<script>
(function () {
  const box = (el) => el.getBoundingClientRect();
  const meets = (a, b) => a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5;
  const out = {overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth, plots: []};
  for (const svg of document.querySelectorAll("figure.plot svg")) {
    const scale = box(svg).width / svg.viewBox.baseVal.width;
    const fonts = [...svg.querySelectorAll("text")].map((t) => parseFloat(getComputedStyle(t).fontSize) * scale);
    const axes = [...svg.querySelectorAll("g[id^=axes_]")].map(box);
    const legends = [...svg.querySelectorAll("g[id^=legend_]")];
    const entries = legends.flatMap((g) => [...g.children].filter((c) => c.id.startsWith("line2d")).map((line) => {
      const label = line.nextElementSibling && line.nextElementSibling.querySelector("text");
      return [label ? label.textContent : "", line.querySelector("path").style.stroke];
    }));
    out.plots.push({cd: svg.closest("figure").classList.contains("cd"), minFont: Math.min(...fonts),
                    overlaps: legends.filter((g) => axes.some((a) => meets(box(g), a))).length, entries});
  }
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
})();
</script>"""


def _lab(colour: str) -> tuple[float, float, float]:
    """CIELAB of a CSS colour (hex or rgb()), to measure how far apart two colours look."""
    if colour.startswith("rgb"):
        channels = [int(v) / 255 for v in re.findall(r"\d+", colour)[:3]]
    else:
        channels = [int(colour.lstrip("#")[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in channels]
    xyz = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047, 0.2126 * r + 0.7152 * g + 0.0722 * b, (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883
    fx, fy, fz = [t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116 for t in xyz]
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium); the browser check needs it")
def test_report_in_headless_chromium(rendered, tmp_path):
    """Open the page as a reader would, at the widths readers use (1280 and 1920 px): the DOM has the
    leaderboard, its rank rule and the plots; the console logs no error; nothing is wider than the
    page; every plot's text renders at 11 px or more; no legend covers an axes; every method has its
    own colour, at least 15 CIELAB units from every other; intervals stay inside [0, 100]."""
    _, out = rendered
    page = out / "probe.html"
    page.write_text((out / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

    def browse(url: str, *extra: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
        return subprocess.run([*flags, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True, timeout=120)

    dom = browse((out / "index.html").resolve().as_uri(), "--dump-dom", "--enable-logging=stderr", "--v=0")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'class="board"' in dom.stdout and dom.stdout.count("<svg") >= 4
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line or "Failed to load" in line]
    assert not console, "\n".join(console)
    rule = re.search(r'<p class="rule">(.*?)</p>', dom.stdout, re.S).group(1)
    assert "Ranked by average rank" in rule and "critical-difference diagram applies the same rule" in rule
    bounds = [float(v) for pair in re.findall(r'<span class="ci">\[([\d.]+), ([\d.]+)\]</span>', dom.stdout) for v in pair]
    assert bounds and 0 <= min(bounds) and max(bounds) <= 100

    for width in (1280, 1920):
        probed = browse(page.resolve().as_uri(), "--dump-dom", f"--window-size={width},1000")
        found = json.loads(html_unescape(re.search(r'<pre id="probe">(.*?)</pre>', probed.stdout, re.S).group(1)))
        assert found["overflow"] <= 0, f"the page is {found['overflow']} px wider than a {width} px window"
        assert len(found["plots"]) >= 4 and any(p["cd"] for p in found["plots"])
        for plot in found["plots"]:
            assert plot["minFont"] >= 11, f"text at {plot['minFont']:.1f} px in a plot at {width} px"
            assert plot["overlaps"] == 0
            methods = {label.replace(" (incomplete)", ""): colour for label, colour in plot["entries"] if label and "reference" not in label
                       and label not in ("published", "ours (mean \u00b1 std)")}
            labs = [_lab(c) for c in methods.values()]
            closest = min((math.dist(a, b) for i, a in enumerate(labs) for b in labs[i + 1 :]), default=math.inf)
            assert closest >= 15, f"two methods' colours are {closest:.1f} CIELAB units apart: {methods}"
    assert any(" (incomplete)" in label for plot in found["plots"] for label, _ in plot["entries"])  # drawn apart, and said so
    shot = tmp_path / "report.png"
    result = browse((out / "index.html").resolve().as_uri(), f"--screenshot={shot}", "--window-size=1440,2400")
    assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]


def test_one_rank_rule_in_the_table_the_exports_the_cd_diagrams_and_compare(rendered):
    """Per shot count the CSV's avg_rank is the critical-difference diagram's average rank; the
    leaderboard's order is the average rank over every (dataset, shots) pair among the methods complete
    everywhere; `compare` applies the same rule to its two methods; gain is over zero-shot."""
    from harness import api
    from harness.report.aggregate import load_runs, ok_runs
    from harness.report.significance import rank_block

    db, out = rendered
    board = pd.read_csv(out / "leaderboard.csv")
    section = board[(board.suite == "standard") & (board.backbone == "ViT-B-16")]
    runs, _ = load_runs(db)
    ok, _ = ok_runs(runs)
    ok = ok[(ok.suite == "standard") & (ok.backbone == "ViT-B-16")]
    for k in (1, 4, 16):
        column = section[(section.shots == k) & section.avg_rank.notna()]
        cd = rank_block(ok[ok.shots == k], sorted(column.method), sorted(STANDARD))
        assert dict(zip(cd.methods, cd.avg_rank)) == pytest.approx(dict(zip(column.method, column.avg_rank)))
    assert set(section[(section.shots == 16) & section.avg_rank.notna()].method) == {"coop_ctx4", "tip_adapter_f", "block_lora"}
    ranked = section.dropna(subset=["overall_rank"]).drop_duplicates("method").sort_values("overall_avg_rank")
    assert list(ranked.method) == ["tip_adapter_f", "coop_ctx4"]  # clip_lora misses a seed, block_lora has a failed run
    markdown = (out / "leaderboard.md").read_text()
    markdown = markdown[markdown.index("## ViT-B-16"):]
    assert markdown.index("| 1 | tip_adapter_f |") < markdown.index("| 2 | coop_ctx4 |") < markdown.index("|  | block_lora |")
    assert "Ranked by average rank" in (out / "leaderboard.tex").read_text()
    few = section[section.shots > 0]
    assert few["gain"].to_numpy() == pytest.approx((few["mean"] - section[section.method == "zero_shot"]["mean"].iloc[0]).to_numpy())
    result = api.compare("coop_ctx4", "tip_adapter_f", db, backbone="ViT-B-16", suite="standard")
    assert result.avg_rank == pytest.approx(tuple(ranked.set_index("method").loc[["coop_ctx4", "tip_adapter_f"], "overall_avg_rank"]))
    assert "the report's rule" in result.ranking

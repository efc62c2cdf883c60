"""`python -m flux2lab.report` on what the stage commands write: every section, self-contained HTML, Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from flux2lab import reporting
from flux2lab.cli import run_main
from flux2lab.common.errors import Flux2LabError
from flux2lab.common.formatting import fmt_number

SECTIONS = ("calibration", "search", "quality", "run", "speed", "provenance")
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def command(main, args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        run_main(main, args)
    return exit_.value.code


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """An experiments folder filled by the real commands on the tiny model, at toy sizes (about 20 s)."""
    from flux2lab import bench, calibrate, compare, run, search

    tmp = tmp_path_factory.mktemp("report")
    exp = tmp / "exp"
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red cube on a table\na lighthouse at dusk\n")
    size = ["--height", "32", "--width", "32"]
    assert command(calibrate.main, ["--model", "tiny", "--name", "cal", "--out", str(exp / "calibration"),
                                    "--limit", "4", "--steps", "6", *size, "--ret-steps", "1"]) == 0
    fit = exp / "calibration" / "cal" / "fit.json"
    assert command(search.main, ["--study", "s", "--experiments", str(exp), "--prompts", str(prompts),
                                 "--calibration", str(fit), "--steps", "6", *size, "--methods", "teacache,taylorseer",
                                 "--threshold", "0.05,0.5", "--ret-steps", "1", "--space", "teacache.residual_order=0",
                                 "--space", "taylorseer.cache_interval=3", "--skip-missing", "--speed-metric",
                                 "computed"]) == 0
    assert command(search.main, ["--study", "s", "--experiments", str(exp), "--freeze", "--min-ssim", "0"]) == 0
    assert command(compare.main, ["--model", "tiny", "--a", "bf16", "--b", "nvfp4", "--prompts", str(prompts),
                                  "--steps", "4", *size, "--metrics", "psnr,ssim", "--cache", str(exp / "cache"),
                                  "--out", str(exp / "compare" / "nvfp4")]) == 0
    assert command(run.main, ["--config", str(exp / "frozen" / "s.json"), "--prompts", str(prompts),
                              "--out", str(exp / "run")]) == 0
    assert command(bench.main, ["--model", "tiny", "--ladder", "eager-bf16", "--steps", "3", *size, "--reps", "1",
                                "--warmup", "0", "--no-floor", "--out", str(exp / "bench")]) == 0
    return exp


@pytest.fixture(scope="module")
def h100_bench(experiments, tmp_path_factory):
    """A benchmark folder outside the experiments folder, as a GPU run writes it (the CPU numbers, relabelled)."""
    from flux2lab.benchmark import write_report

    result = json.loads((experiments / "bench" / "bench.json").read_text())
    result["environment"].update(cuda=True, device="cuda:0", device_name="NVIDIA H100 80GB HBM3",
                                 compute_capability="9.0", memory_gib=79.2, driver="580.1", cuda_runtime="13.0")
    out = tmp_path_factory.mktemp("benchmarks") / "h100"
    write_report(result, out)
    return out


@pytest.fixture(scope="module")
def written(experiments, h100_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "report"
    report = reporting.build(experiments, bench_dirs=[h100_bench], command="python -m flux2lab.report ...")
    return report, reporting.write(report, out)


class _Page(HTMLParser):
    """What a reader sees: section ids with their h2, images, and anything that would reach the network."""

    def __init__(self):
        super().__init__()
        self.sections, self.h2, self.images, self.external, self.scripts = [], [], [], [], 0
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "h2":
            self._in_h2 = True
        if tag == "img":
            self.images.append((self.sections[-1] if self.sections else None, a.get("src", ""), a.get("alt", "")))
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if re.match(r"(https?:)?//", a.get(key) or ""):
                self.external.append(a[key])

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())


def parse(html_text: str) -> _Page:
    page = _Page()
    page.feed(html_text)
    return page


def decode_png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), f"image not embedded: {src[:60]}"
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.width > 50 and im.height > 50
    return im


def assert_renders(page: _Page, sections=SECTIONS) -> None:
    """Every section there with its heading and every image a decodable embedded PNG."""
    assert page.sections == list(sections)
    assert len(page.h2) == len(sections) and all(page.h2)
    assert page.images and not page.external and not page.scripts
    for _, src, alt in page.images:
        decode_png(src)
        assert alt
    with_images = {s for s, _, _ in page.images}
    assert set(sections) - {"provenance"} <= with_images, "a section lost its figure"


def test_every_section_shows_what_the_folder_holds(experiments, written):
    report, paths = written
    html_text = paths["html"].read_text()
    page = parse(html_text)
    assert_renders(page)

    fit = json.loads((experiments / "calibration" / "cal" / "fit.json").read_text())
    cal = report.section("calibration")
    text = reporting.to_markdown(reporting.Report("t", "s", "c", [cal]), {id(b): "x" for b in cal.blocks})
    assert f"{fit['coefficients'][0]:.6e}" in text and "held-out R²" in text and "Threshold advice" in text
    assert fit["skip_limits"]["advice"][0] in text
    assert "tiny: random weights" in text

    frozen = json.loads((experiments / "frozen" / "s.json").read_text())
    number = frozen["provenance"]["trial"]["number"]
    md = paths["markdown"].read_text()
    assert re.search(rf"\| {number} \| [^\n]*★ frozen", md), "the frozen trial is not marked in the trial table"
    assert f"Trial {number} was frozen into frozen/s.json" in md
    method = frozen["recipe"]["cache"]["method"]
    assert f"Trial {number} was frozen into frozen/s.json: {method} " in md, "the winner: its method and settings"
    assert re.search(r"\| teacache \| threshold=0.05 ret_steps=1 residual_order=0 \| complete \|", md)
    assert re.search(r"\| taylorseer \| cache_interval=3 use_lite_mode=true \| complete \|", md), "one table, both methods"

    metrics = json.loads((experiments / "compare" / "nvfp4" / "metrics.json").read_text())
    psnr = metrics["metrics"]["psnr"]["summary"]
    assert f"[{fmt_number(psnr['low'])}, {fmt_number(psnr['high'])}]" in md
    assert "Measured on model tiny" in md and "Not measured here: lpips, fid, clip" in md

    assert f"{frozen['sha256'][:12]} (verified)" in md and "= frozen/s.json" in md
    assert "NVIDIA H100 80GB HBM3" in md and "(no GPU: CPU run)" in md, "each benchmark names its card"
    import diffusers
    import torch

    assert f"| torch | {torch.__version__} |" in md and f"| diffusers | {diffusers.__version__} |" in md
    assert "python -m flux2lab.bench --model tiny --ladder eager-bf16" in md
    assert re.search(r"study s \| study configuration[^\n]*\| [0-9a-f]{12} \|", md)


def test_markdown_has_the_same_sections_and_its_images_beside_it(written):
    report, paths = written
    md = paths["markdown"].read_text()
    for s in report.sections:
        assert f"## {s.title}" in md and f'<a id="{s.id}"></a>' in md
    links = re.findall(r"!\[[^\]]*\]\((images/[^)]+)\)", md)
    embedded = [src for _, src, _ in parse(paths["html"].read_text()).images]
    assert len(links) == len(embedded) == len(set(links))
    for link, src in zip(links, embedded):
        assert (paths["markdown"].parent / link).read_bytes() == base64.b64decode(src.split(",", 1)[1])


def test_a_tampered_frozen_config_is_shown_refused(experiments, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(experiments, exp, ignore=shutil.ignore_patterns("cache", "reference", "run", "studies.db*"))
    data = json.loads((exp / "frozen" / "s.json").read_text())
    data["recipe"]["steps"] = 2
    (exp / "frozen" / "s.json").write_text(json.dumps(data))
    section = reporting.build(exp).section("run")
    row = next(b for b in section.blocks if isinstance(b, reporting.Table)).rows[0]
    assert row[1] == "REFUSED" and "modified after it was frozen" in row[2]


def test_command_writes_the_report_and_says_where(experiments, h100_bench, tmp_path, capsys):
    from flux2lab import report

    out = tmp_path / "r"
    assert command(report.main, ["--experiments", str(experiments), "--bench", str(h100_bench), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in stdout and (out / "index.md").is_file()
    assert "python -m flux2lab.report --experiments" in (out / "index.md").read_text()

    only_bench = tmp_path / "b"
    assert command(report.main, ["--bench", str(h100_bench), "--out", str(only_bench)]) == 0
    assert parse((only_bench / "index.html").read_text()).sections == ["speed", "provenance"]


@pytest.mark.parametrize("args, message", [
    ([], "give --experiments DIR"),
    (["--experiments", "/nonexistent/exp"], "--experiments /nonexistent/exp: no such folder"),
    (["--experiments", "{empty}"], "nothing to report in"),
    (["--experiments", "{empty}", "--bench", "{empty}"], "no bench.json from python -m flux2lab.bench there"),
])
def test_user_errors_name_the_flag(tmp_path, capsys, args, message):
    from flux2lab import report

    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    assert command(report.main, [*args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(Flux2LabError):
        reporting.build(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ headless Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_render(index: Path, tmp: Path) -> tuple[Image.Image, str]:
    """Screenshot and DOM of the page as headless Chromium renders it (skips the test without Chromium)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's `chromium` package; "
                    "`apt-get install -y chromium`)")
    url = index.resolve().as_uri()
    shot = tmp / "screenshot.png"
    common = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,4000"]
    subprocess.run([*common, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    return Image.open(shot), dom


def assert_screenshot(shot: Image.Image) -> None:
    assert shot.size == (1280, 4000)
    colours = shot.convert("RGB").resize((320, 1000)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 200, "the screenshot is (nearly) blank"


def test_headless_chromium_renders_every_section_without_broken_images(written, tmp_path):
    _, paths = written
    shot, dom = chromium_render(paths["html"], tmp_path)
    assert_screenshot(shot)
    assert_renders(parse(dom))

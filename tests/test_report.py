"""The run report (`python -m grpo_img.report RUN_DIR`), opened from disk in a real headless browser (Debian's
chromium driven by playwright): no console errors, every image loads, a screenshot is saved."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_img.config import load_config
from grpo_img.report import write_report
from grpo_img.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def browser_path() -> str | None:
    return os.environ.get("GRPO_IMG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """Four steps of the demo with samples logged every other step and an evaluation every two steps."""
    out = tmp_path_factory.mktemp("report") / "run"
    config = load_config(None, {"output_dir": str(out), "max_steps": "4", "image_log_steps": "2", "save_steps": "0",
                                "report_to": "none", "eval_steps": "2",
                                "eval_prompts": '["a red image", "a blue image"]', "eval_num_images": "2"})
    train(config)
    return out


def test_the_report_page_has_the_curves_samples_over_training_and_evaluations(evaluated_run):
    page = write_report(evaluated_run)
    text = page.read_text()
    for figure in ("rewards.png", "per_prompt.png", "training.png", "evaluation.png"):
        assert (page.parent / "figures" / figure).stat().st_size > 5000, figure
        assert f'src="figures/{figure}"' in text
    # each training prompt's samples at steps 1, 2 and 4, in one row, copied next to the page
    for prompt in ("a red image", "a green image", "a blue image"):
        assert f"<h3>{prompt}</h3>" in text
    for step in (1, 2, 4):
        assert f"step {step}: mean" in text
    assert len(list((page.parent / "images").glob("*.png"))) == 3 * 3
    # the evaluations' table (steps 2 and 4) and the last evaluation's grid
    assert "<table class='eval'>" in text and "<tr><td>2</td>" in text and "<tr><td>4</td>" in text
    assert list((page.parent / "eval").glob("step_000004_*.png"))
    # the page refers to nothing outside its folder: every src/href is a relative path to a file inside it
    references = re.findall(r"""(?:src|href)=["']([^"']+)["']""", text)
    assert references and all(not re.match(r"[a-z]+:|/", ref) and (page.parent / ref).is_file() for ref in references)


def test_the_report_renders_in_a_headless_browser_with_every_image_loaded(evaluated_run, tmp_path):
    executable = browser_path()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on this CI machine: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    page_path = write_report(evaluated_run)
    shared = tmp_path / "shared"  # moved elsewhere, as someone who was sent the zipped folder would open it
    shutil.copytree(page_path.parent, shared)
    problems, failed = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto((shared / "index.html").as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                               "i.naturalWidth, i.naturalHeight])")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert problems == [] and failed == []
    assert len(images) == 4 + 9 + 1  # figures, sample strips, the evaluation grid
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in images), images
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_the_report_command_writes_the_page_and_refuses_a_folder_that_is_no_run(evaluated_run, tmp_path):
    done = subprocess.run([sys.executable, "-m", "grpo_img.report", str(evaluated_run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "report/index.html" in done.stdout
    refused = subprocess.run([sys.executable, "-m", "grpo_img.report", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "not a grpo-img run folder" in refused.stderr

"""The demo's report.html: one self-contained page that links the files the demo wrote beside it."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

ORIGINS = {"shipped": "shipped with my3dgen, checked against its zoo sha256; not trained here",
           "cached": "cached by an earlier my3dgen", "rebuilt": "fitted in this run from the recipe (--rebuild-base)"}
SECTIONS = ("about", "photos", "training", "inversion", "orbit", "interpolation", "metrics", "export", "files")


def render_report(result: Any, synthetic: bool, ident: dict[str, Any], evaluation: Any, invert_psnr: float,
                  held_name: str, settings: Any) -> str:
    """report.html: one self-contained page linking the files next to it (relative paths).

    result: the run's DemoResult; settings: its DemoSettings. Long because it is the page's text,
    one section after the other (SECTIONS), not logic."""
    def rel(key: str) -> str:
        return html.escape(str(Path(result.files[key]).relative_to(result.out_dir)))

    def img(key: str, alt: str) -> str:
        return f'<img src="{rel(key)}" alt="{html.escape(alt)}">'

    if synthetic:
        about = ("<p><b>A tiny synthetic base, not a face model.</b> The base is the tiny EG3D (64 px images, "
                 "32 px neural render) fitted in a minute or two of CPU to simple 3-D heads (an ellipsoid with a "
                 "nose, hair, eyes and a mouth; colours and proportions vary with z). The &ldquo;person&rdquo; is "
                 "this base plus a hidden low-rank change (other colours, a wider face, a bigger nose), seen in 10 "
                 "training views with known cameras; 2 more views are held out. Everything below is the real "
                 f"pipeline on it.</p><p>Base <code>{html.escape(result.base)}</code> "
                 f"({html.escape(ORIGINS[result.base_origin])}).</p>")
    else:
        about = f"<p>Base <code>{html.escape(result.base)}</code> on your photos; the last photo is held out.</p>"
    ex = result.export
    export_html = (f"<p>ONNX: <code>{rel('onnx')}</code> ({ex['size'] / 2**20:.1f} MiB); onnxruntime vs "
                   f"PyTorch max abs diff {ex['max_abs_diff']:.2e}.</p>" if "path" in ex else
                   f"<p>ONNX export skipped: {html.escape(ex.get('skipped', ''))}</p>")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>"
                   for k, v in result.files.items())
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.steps.items())
    table = html.escape(evaluation.table())
    better = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in evaluation.better().items())
    photos_html = (f'<p>{"".join(_thumb(p) for p in sorted((result.out_dir / "photos").glob("train*.png")))}</p>'
                   if synthetic else "<p>Your photos (see the training grid below).</p>")
    parts = {
        "about": ("What this is", about + f"<p>Stages: {html.escape(timing)}.</p>"),
        "photos": ("Training photos", photos_html),
        "training": ("Personalization", f"<p>Identity <code>{html.escape(ident['name'])}</code>: "
                     f"{ident['parameters']:,} adapter "
                     f"parameters ({ident['ratio']}x fewer than the generator), {ident['steps']} steps, final loss "
                     f"{ident['final_loss']:.4f}.</p>{img('loss_plot', 'loss curve')}"
                     f"{img('previews', 'photo vs personalized render')}"),
        "inversion": ("Inverting a held-out view", f"<p>{html.escape(held_name)} (left) and its inversion under the "
                      f"personalized prior (right), {settings.eval_steps} steps, PSNR {invert_psnr:.2f} dB; latent "
                      f"in <code>{rel('latent')}</code>.</p>{img('inversion', 'held-out view and inversion')}"),
        "orbit": ("Orbit", f"{img('orbit_gif', 'orbit')}<p>{img('contact_sheet', 'yaw -50 to 50')}</p>"),
        "interpolation": ("Interpolating two photos", f"<p>First to last training photo (slerp of their anchors, "
                          f"cameras interpolated).</p>{img('interpolation', 'interpolation strip')}"),
        "metrics": ("Metrics: base vs personalized", f"<p>Held-out views inverted under each model "
                    f"({settings.eval_steps} steps). Personalized better: {html.escape(better)}.</p>"
                    f"<pre>{table}</pre><p>All numbers: <code>{rel('metrics')}</code>.</p>"),
        "export": ("Export", export_html),
        "files": ("Where files went", f"<table>{rows}</table>"),
    }
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>' for key, (title, content) in
                   ((k, parts[k]) for k in SECTIONS))
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}img{image-rendering:pixelated;"
             "margin:2px}pre{background:#f4f4f4;padding:8px}td{padding:2px 8px}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>my3dgen demo</title><style>{style}</style>"
            f"</head><body><h1>my3dgen demo</h1>{body}</body></html>\n")


def _thumb(path: Path) -> str:
    return f'<img src="photos/{html.escape(path.name)}" alt="{html.escape(path.stem)}" width="96">'

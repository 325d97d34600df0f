"""The command line every single-table benchmark shares: measure at the CPU (`--quick`)
or the GPU sizes, write NAME.json (the data) and NAME.md (its rendering) into `--out`,
or re-render NAME.md from a folder's NAME.json (`--render DIR`)."""

import argparse
import json
import os
from collections.abc import Callable


def device_name() -> str:
    """The device results are labelled with: the GPU's kind, or "N-core CPU"."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"{os.cpu_count()}-core CPU"
    return device.device_kind


def main(
    name: str,
    description: str,
    measure: Callable[[bool], dict],
    render: Callable[[dict], str],
    argv=None,
) -> None:
    """`measure(quick)` gives the result (without `device` and `command`, added here);
    `render(result)` its Markdown."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="CPU sizes")
    parser.add_argument("--out", help=f"folder for {name}.json and {name}.md")
    parser.add_argument("--render", metavar="DIR", help="only re-render DIR's table")
    args = parser.parse_args(argv)
    if args.render:
        with open(os.path.join(args.render, f"{name}.json")) as f:
            result = json.load(f)
    else:
        result = dict(
            device=device_name(),
            command=f"python benchmarks/{name}.py" + (" --quick" if args.quick else ""),
            **measure(args.quick),
        )
    text = render(result)
    print(text)
    out = args.render or args.out
    if out:
        os.makedirs(out, exist_ok=True)
        if not args.render:
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(result, f, indent=1)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(text)

"""`flythinker info`: versions, the backend each fused op uses per device, devices, cache folder."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "versions, active kernel backends, devices, cache folder"
DESCRIPTION = ("Print flythinker/torch/triton/transformers versions, the backend each fused op would use on each "
               "device (Triton / C++ / PyTorch), devices and the model cache folder.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def print_info(as_json: bool = False, out=None) -> None:
    """Print :func:`flythinker.info.collect` as text (or JSON) to `out` (default stdout)."""
    from flythinker.info import collect

    out = out or sys.stdout
    info = collect()
    if as_json:
        json.dump(info, out, indent=2)
        out.write("\n")
        return
    v = info["versions"]
    print("versions:  " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v), file=out)
    print("devices:   " + ", ".join(info["devices"]) + (f"  ({', '.join(info['gpus'])})" if info["gpus"] else "")
          + f"; CPU {info['cpu']['machine']} x{info['cpu']['cores']} cores, torch threads "
            f"{info['cpu']['torch_threads']}", file=out)
    print("backends:  (op: on CPU tensors / on CUDA tensors)", file=out)
    for op, per in info["backends"].items():
        cuda_note = "" if info["cuda_available"] else " (no CUDA device here)"
        print(f"  {op:22s} cpu: {per['cpu']:8s} cuda: {per['cuda']}{cuda_note}", file=out)
    if info["triton_interpret"]:
        print("  TRITON_INTERPRET=1: Triton kernels run in the (slow) interpreter", file=out)
    pa = info["parallel_auto"]
    print(f"parallel:  'auto' = {pa['rule']}", file=out)
    for key, status in pa["measured"].items():
        print(f"  {key}: {describe_auto(status)}", file=out)
    print(f"cache:     {info['cache_dir']} (set FLYTHINKER_CACHE to move it)", file=out)
    print(f"models:    cached {info['cached_models'] or 'none yet'}; known short names {info['known_models']}",
          file=out)


def _conditions(status: dict) -> str:
    """When and under what load a saved measurement was taken, in words ("" for an entry that did not record it)."""
    from flythinker.parallel_auto import format_age

    if status["age_s"] is None:
        return ""
    load = status["load_avg"]
    at_load = f"1-min load {load[0]:.2f}" if load else "load not recorded"
    return f"measured {format_age(max(status['age_s'], 0.0))} ago, {at_load} on {status['cpu_count'] or '?'} cores"


def describe_auto(status: dict) -> str:
    """One saved `parallel="auto"` decision (`flythinker.parallel_auto.entry_status`) in words: what a new process
    would pick and why, or that it would measure again and why."""
    when = _conditions(status)
    if status["stale"]:
        return f"would re-measure: {status['stale']} (saved: {status['mode']}{', ' + when if when else ''})"
    return f"would pick {status['would']}: {status['reason']} ({when})"


def run(args: argparse.Namespace) -> int:
    """Run `flythinker info`; returns the exit status."""
    print_info(as_json=args.json)
    return 0

"""Peak memory of loading and converting a full-size checkpoint (random weights).

    python bench/checkpoint_memory.py --preset paligemma-3b-224 --dtype float32 --dir /tmp/pg-bench

Writes a random big_vision `.npz` of the preset's exact shapes (streamed, tensor by tensor),
then, each in a fresh process so peaks do not mix: loads it and reads every weight; converts
it to an HF directory; loads the HF directory. Prints a table of wall time and peak RSS
(`ru_maxrss`, which counts memory-mapped file pages once they are read) against the
checkpoint's size. Needs free disk of about twice the checkpoint.
"""

import argparse
import os
import subprocess
import sys
import time
import zipfile

import ml_dtypes
import numpy as np

from paligemma import ref
from paligemma.ref.params import flatten, param_shapes

STEPS = {
    "load npz + read all": "config, params = ref.load(NPZ); touch(params)",
    "npz -> HF (save)": "config, params = ref.load(NPZ); ref.save(HF, config, params, format='hf', overwrite=True)",
    "load HF + read all": "config, params = ref.load(HF); touch(params)",
}


def write_random_npz(path, config, dtype, seed=0):
    """A big_vision .npz written one tensor at a time, so this process never holds it all."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, shape in flatten(param_shapes(config)).items():
            value = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
            if value.dtype == ml_dtypes.bfloat16:
                value = value.view("V2")  # how NumPy (and big_vision) store bfloat16
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, value, allow_pickle=False)


def measure(step, npz, hf):
    code = f"""
import resource, time
import numpy as np
from paligemma import ref
NPZ, HF = {npz!r}, {hf!r}
def touch(tree):  # one byte of every 4 KiB page: every page is read, nothing is copied
    return sum(int(np.asarray(x).reshape(-1).view(np.uint8)[::4096].sum()) for x in ref.flatten(tree).values())
t0 = time.perf_counter()
{STEPS[step]}
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    seconds, rss = out.split()
    return float(seconds), int(rss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paligemma-3b-224")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--dir", default="/tmp/paligemma-bench")
    parser.add_argument("--reuse", action="store_true", help="keep an .npz left by an earlier run")
    args = parser.parse_args()
    config = ref.get_config(args.preset)
    dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    os.makedirs(args.dir, exist_ok=True)
    npz, hf = os.path.join(args.dir, f"{args.preset}.npz"), os.path.join(args.dir, f"{args.preset}-hf")
    t0 = time.perf_counter()
    if args.reuse and os.path.exists(npz):
        how = "reused"
    else:
        write_random_npz(npz, config, dtype)
        how = f"written in {time.perf_counter() - t0:.0f}s"
    size = os.path.getsize(npz)
    print(f"{args.preset} {args.dtype}: {ref.count_params(config):,} params, {size / 1e9:.2f} GB {how}\n")
    print("| step | seconds | peak RSS (GB) | peak RSS / checkpoint |")
    print("|---|---|---|---|")
    for step in STEPS:
        seconds, rss = measure(step, npz, hf)
        print(f"| {step} | {seconds:.0f} | {rss / 1e9:.2f} | {rss / size:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""`python -m svk.info`: versions, device, and which backends and native pieces are available
(and why not), in the manner of `python -m xformers.info`."""
import platform

import torch

import svk


def collect():
    from svk.ops import _dispatch

    rows = [("svk", svk.__version__), ("python", platform.python_version()),
            ("torch", torch.__version__)]
    try:
        import triton
        rows.append(("triton", triton.__version__))
    except Exception as error:  # not installed on this platform
        rows.append(("triton", f"not available ({type(error).__name__}: {error})"))
    if torch.cuda.is_available():
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(0)
        rows.append(("device", f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                               f"capability {props.major}.{props.minor}, CUDA {torch.version.cuda}"))
    else:
        device = torch.device("cpu")
        rows.append(("device", "cpu (no CUDA device visible to torch)"))
    rows.append(("backend torch", "available"))
    ok, reason = _dispatch.triton_usable(device)
    interp = " (through TRITON_INTERPRET=1)" if ok and device.type == "cpu" else ""
    rows.append(("backend triton", f"available{interp}" if ok else f"unavailable: {reason}"))
    rows.append(("backend auto", "triton on CUDA tensors, torch on CPU tensors"
                 if ok and device.type == "cuda" else "torch"))
    try:
        from svk import _native
        for name, (available, why) in _native.status().items():
            rows.append((f"native {name}", "available" if available else f"unavailable: {why}"))
    except ImportError as error:
        rows.append(("native", f"unavailable: {error}"))
    return rows


def main():
    rows = collect()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()

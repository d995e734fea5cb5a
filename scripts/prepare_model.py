#!/usr/bin/env python3
"""Derives the embedder's model from the pinned open-nsfw model: the network up to its last
block (the tensor the embedding is pooled from), with any input height and width, and, with
`--int8`, its convolutions quantized to 8 bits (QDQ, per-channel weights) by ONNX Runtime's
own quantizer.

Why: the embedding is the last block pooled by the service (GeM), so the classifier head is
dead weight; a free input size lets the service embed the low-passed view of a photo at a
reduced size (a Gaussian-blurred crop holds no detail a smaller image could not, and costs a
third as much); 8-bit convolutions take about a third of float32's CPU time.

Deterministic: the activation ranges come from a committed calibration file (`--ranges`), so
the same tool versions write the same bytes on any machine (scripts/fetch-model.sh checks the
result's sha256). Weights are quantized to 7 bits (`reduce_range`), so the 8-bit kernels of
CPUs without VNNI cannot saturate and every CPU computes the same embedding.

`--calibrate FOLDER` (re)writes the ranges file from the photos of FOLDER, preprocessed as the
service does: shorter side 256, centre crop 224, and that crop low-passed (Gaussian of
`--low-pass-sigma`) and reduced to `--low-pass-size`, the embedder's second view.

Usage: prepare_model.py SRC DEST [--output Relu_48] [--int8 --ranges FILE
                        [--calibrate DIR [--low-pass-sigma 5] [--low-pass-size 128]]]
Needs: onnx, onnxruntime and numpy (scripts/fetch-model.sh installs pinned versions), and
pillow for --calibrate.
"""
import argparse
import sys
from pathlib import Path

import onnx
from onnx import version_converter

# QuantizeLinear/DequantizeLinear with a per-channel axis need opset 13.
OPSET = 13


def truncated(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """The graph that computes `output` (a node's name, its first output taken, or a tensor's),
    as the model's only output, with a free input height and width."""
    g = model.graph
    by_name = {n.name: n for n in g.node}
    tensor = by_name[output].output[0] if output in by_name else output
    producers = {o: n for n in g.node for o in n.output}
    if tensor not in producers:
        sys.exit(f"prepare_model: the model has no node or tensor named {output!r}")
    # Keep what the output depends on, in the graph's (topological) order.
    needed, todo = set(), [tensor]
    while todo:
        t = todo.pop()
        n = producers.get(t)
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            todo.extend(i for i in n.input if i)
    nodes = [n for n in g.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    out = onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph(nodes, g.name, list(g.input), [out], inits)
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        sys.exit("prepare_model: the model's input is not an image batch")
    # NHWC or NCHW: the two spatial axes are the two that equal each other.
    spatial = (1, 2) if dims[1].dim_value == dims[2].dim_value else (2, 3)
    for axis, name in zip(spatial, ("height", "width")):
        dims[axis].Clear()
        dims[axis].dim_param = name
    m = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="prepare_model.py")
    m.ir_version = model.ir_version
    return without_inferred_shapes(version_converter.convert_version(m, OPSET))


def without_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the intermediate shapes the tools inferred for one input size (tract
    would hold a runtime to them), its output's shape left free too."""
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return model


def calibration_reader(folder: Path, input_name: str, low_pass_sigma: float, low_pass_size: int):
    from onnxruntime.quantization import CalibrationDataReader
    from PIL import Image, ImageFilter, ImageOps

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_loop import centre_crop, normalise, resize_short

    def inputs():
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            crop = centre_crop(resize_short(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
            yield {input_name: normalise(crop)}
            low = crop.filter(ImageFilter.GaussianBlur(low_pass_sigma)).resize((low_pass_size, low_pass_size), Image.BILINEAR)
            yield {input_name: normalise(low)}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = inputs()

        def get_next(self):
            return next(self.it, None)

    return Reader()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--output", default="Relu_48")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--ranges", type=Path)
    ap.add_argument("--calibrate", type=Path)
    ap.add_argument("--low-pass-sigma", type=float, default=5.0)
    ap.add_argument("--low-pass-size", type=int, default=128)
    args = ap.parse_args()

    model = truncated(onnx.load(str(args.src)), args.output)
    tmp = args.dest.with_name(args.dest.name + ".tmp")
    if not args.int8:
        onnx.save(model, str(tmp))
        tmp.replace(args.dest)
        return
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if args.ranges is None:
        sys.exit("prepare_model: --int8 needs --ranges")
    reader = None
    if args.calibrate is not None:
        args.ranges.unlink(missing_ok=True)
        reader = calibration_reader(args.calibrate, model.graph.input[0].name, args.low_pass_sigma, args.low_pass_size)
    elif not args.ranges.exists():
        sys.exit(f"prepare_model: {args.ranges} is missing (make it with --calibrate DIR)")
    float_model = args.dest.with_name(args.dest.name + ".float.tmp")
    onnx.save(model, str(float_model))
    try:
        quantize_static(
            str(float_model),
            str(tmp),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=str(args.ranges),
        )
    finally:
        float_model.unlink(missing_ok=True)
    # The quantizer folds the last Relu into the output's quantization; the node that now
    # makes the output takes its name, so `embedder.output` names the same tensor in both.
    quantized = without_inferred_shapes(onnx.load(str(tmp)))
    last = next(n for n in quantized.graph.node if quantized.graph.output[0].name in n.output)
    last.name = args.output
    onnx.save(quantized, str(tmp))
    tmp.replace(args.dest)


if __name__ == "__main__":
    main()

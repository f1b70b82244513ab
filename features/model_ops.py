"""Model files that are programs, checked before loading: TensorFlow SavedModels (frozen extractors, Object
Detection API detectors) and TFLite files with TensorFlow ("Flex") ops.

A SavedModel is a program: its graph may hold any TensorFlow op, including ops that read or write files
(``ReadFile``, ``WriteFile``, ``MatchingFiles``, readers and writers), call Python (``PyFunc``) or load kernels.
Loading one and calling its signature runs those ops with the user's rights. :func:`load_saved_model` therefore
parses ``saved_model.pb`` first and checks the type of every node, in every meta graph and every function of its
library, against :data:`TENSOR_OPS`, an allow-list of pure tensor ops (maths, arrays, convolutions, control flow,
variables, image resizing and non-maximum suppression: what Keras applications exported with ``model.export`` and
the Object Detection API's exports are made of). Anything else is refused with a :class:`CairnError` naming the
op and the file, before TensorFlow loads anything.

One exception: the saver that TensorFlow writes into every SavedModel (``saver_def``: a save function with
``SaveV2``/``MergeV2Checkpoints`` and a restore function with ``RestoreV2``) may hold checkpoint ops, and only
the nodes and functions reached from the saver alone; a model function that calls them is refused like any other.
TensorFlow 2's loader restores variables itself and runs neither.

A TFLite file runs TFLite's builtin kernels, which touch only tensors; but one converted with ``SELECT_TF_OPS``
carries TensorFlow ops (custom ops named ``Flex<Op>``), which an interpreter linked with the Flex delegate runs.
:func:`check_tflite` holds those to the same allow-list.
"""

from __future__ import annotations

import os

from pipeline.errors import CairnError

# Pure tensor ops: no file, process, network or Python access. Built from the op types of Keras applications
# (MobileNet, ResNet, EfficientNet) exported with `model.export`, Cairn's own models, and the TF2 Object
# Detection API's exported detectors, plus their close relatives.
TENSOR_OPS = frozenset("""
    Const Identity IdentityN NoOp Placeholder PlaceholderWithDefault StopGradient PreventGradient Snapshot
    EnsureShape CheckNumerics CheckNumericsV2 Assert
    StatefulPartitionedCall PartitionedCall If StatelessIf While StatelessWhile Case StatelessCase
    Enter Exit Merge Switch NextIteration LoopCond ControlTrigger
    VarHandleOp ReadVariableOp AssignVariableOp AssignAddVariableOp AssignSubVariableOp VarIsInitializedOp
    DestroyResourceOp DisableCopyOnRead ResourceGather ResourceGatherNd VariableV2 Variable Assign IsVariableInitialized
    HashTableV2 LookupTableFindV2 LookupTableImportV2 LookupTableSizeV2 InitializeTableV2
    Add AddV2 AddN Sub Mul MulNoNan Div DivNoNan RealDiv FloorDiv FloorMod Mod TruncateDiv TruncateMod
    Maximum Minimum Neg Abs Sign Square Sqrt Rsqrt Reciprocal Inv Exp Expm1 Log Log1p Pow SquaredDifference
    Floor Ceil Round Rint Sin Cos Tan Tanh Sigmoid Atan Atan2 Asin Acos Sinh Cosh Asinh Acosh Atanh Erf Erfc Erfinv
    IsFinite IsNan IsInf Equal NotEqual Less LessEqual Greater GreaterEqual LogicalAnd LogicalOr LogicalNot
    Select SelectV2 Cast BitwiseAnd BitwiseOr BitwiseXor LeftShift RightShift
    MatMul BatchMatMul BatchMatMulV2 BatchMatMulV3 Einsum Sum Mean Max Min Prod All Any ArgMax ArgMin
    Cumsum Cumprod ClipByValue BiasAdd BiasAddV1 Softmax LogSoftmax Relu Relu6 Elu Selu LeakyRelu Softplus
    Softsign Conv2D Conv3D Conv2DBackpropInput Conv3DBackpropInputV2 DepthwiseConv2dNative
    DepthwiseConv2dNativeBackpropInput MaxPool MaxPoolV2 MaxPool3D AvgPool AvgPool3D MaxPoolWithArgmax
    FusedBatchNorm FusedBatchNormV2 FusedBatchNormV3 LRN L2Loss TopKV2 InTopKV2
    NonMaxSuppression NonMaxSuppressionV2 NonMaxSuppressionV3 NonMaxSuppressionV4 NonMaxSuppressionV5
    NonMaxSuppressionWithOverlaps CombinedNonMaxSuppression
    ResizeBilinear ResizeNearestNeighbor ResizeBicubic ResizeArea CropAndResize ScaleAndTranslate
    ImageProjectiveTransformV2 ImageProjectiveTransformV3 ExtractImagePatches AdjustContrastv2 AdjustHue
    AdjustSaturation RGBToHSV HSVToRGB DecodeJpeg DecodePng DecodeImage DecodeBmp DecodeGif ExtractJpegShape
    Reshape Shape ShapeN Size Rank Squeeze ExpandDims Transpose ConjugateTranspose ConcatV2 Concat ConcatOffset
    Split SplitV Slice StridedSlice Pack Unpack Tile Pad PadV2 MirrorPad Fill ZerosLike OnesLike Range LinSpace
    GatherV2 Gather GatherNd ScatterNd TensorScatterUpdate TensorScatterAdd TensorScatterMax TensorScatterMin
    Where Reverse ReverseV2 ReverseSequence BroadcastTo BroadcastArgs BroadcastGradientArgs OneHot
    SpaceToBatchND BatchToSpaceND SpaceToDepth DepthToSpace Unique UniqueV2 InvertPermutation ListDiff
    MatrixDiag MatrixDiagV2 MatrixDiagV3 MatrixDiagPart MatrixDiagPartV3 MatrixBandPart MatrixSetDiag
    MatrixSetDiagV3 Diag DiagPart UnsortedSegmentSum UnsortedSegmentMax UnsortedSegmentMin SegmentSum SegmentMax
    SparseToDense Bucketize
    RandomUniform RandomUniformInt RandomStandardNormal TruncatedNormal StatelessRandomUniformV2
    StatelessRandomNormalV2 StatelessRandomGetKeyCounter StatelessRandomGetKeyCounterAlg StatelessRandomGetAlg
    StatelessTruncatedNormalV2 StatelessRandomUniformIntV2
    TensorListReserve TensorListFromTensor TensorListGetItem TensorListSetItem TensorListStack TensorListLength
    TensorListElementShape TensorListPushBack TensorListPopBack EmptyTensorList TensorListConcatV2
    TensorListResize TensorListGather TensorListScatterIntoExistingList
    TensorArrayV3 TensorArrayWriteV3 TensorArrayReadV3 TensorArrayGatherV3 TensorArrayScatterV3 TensorArraySizeV3
    TensorArrayConcatV3 TensorArraySplitV3 TensorArrayCloseV3
""".split())

# Ops allowed only in the part of the graph that TensorFlow's own saver (meta_graph.saver_def) reaches.
SAVE_OPS = frozenset({"SaveV2", "Save", "SaveSlices", "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec",
                      "StringJoin", "StaticRegexFullMatch"})
RESTORE_OPS = frozenset({"RestoreV2", "Restore", "RestoreSlice"})


def _called_functions(node, library: dict) -> list[str]:
    """Library functions a node calls: through func attributes (f, then_branch, body, branches...) or as its op."""
    names = [node.op] if node.op in library else []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
    return [n for n in names if n in library]


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _backward(nodes: dict, start: str) -> set[str]:
    """Names of the top-level nodes ``start`` depends on (itself included), through data and control inputs."""
    seen, todo = set(), [_node_name(start)] if start else []
    while todo:
        name = todo.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        todo.extend(_node_name(i) for i in nodes[name].input)
    return seen


def _functions_from(roots: list[str], library: dict) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in library[name].node_def:
            todo.extend(_called_functions(node, library))
    return seen


def _reach(top: set[str], nodes: dict, library: dict) -> set[str]:
    """Library functions that the top-level nodes ``top`` call, directly or not."""
    return _functions_from([f for name in top for f in _called_functions(nodes[name], library)], library)


def _refuse(path: str, op: str, where: str, what: str = "a SavedModel") -> CairnError:
    return CairnError(
        f"{path}: the model holds the op {op} (in {where}), which is not a pure tensor op; {what} that can read or "
        "write files, start processes, reach the network or call Python is code, and Cairn loads no code. Export "
        "the model with tensor ops only (e.g. Keras' model.export, a TFLite conversion without SELECT_TF_OPS), "
        "or give a .keras file")


def check_saved_model(path: str) -> None:
    """CairnError unless every op of the SavedModel folder ``path`` is a pure tensor op (see the module's doc)."""
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(path, "saved_model.pb")
    model = saved_model_pb2.SavedModel()
    try:
        with open(pb, "rb") as f:
            model.ParseFromString(f.read())
    except OSError as e:
        raise CairnError(f"{path}: cannot read saved_model.pb ({e}); give a SavedModel folder") from None
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise CairnError(f"{path}: saved_model.pb is not a SavedModel ({type(e).__name__}: {e})") from None
    for meta in model.meta_graphs:
        _check_meta_graph(path, meta)


def _check_meta_graph(path: str, meta) -> None:
    graph = meta.graph_def
    library = {f.signature.name: f for f in graph.library.function}
    nodes = {n.name: n for n in graph.node}
    served = set().union(*(_backward(nodes, t.name) for sig in meta.signature_def.values()
                           for t in [*sig.inputs.values(), *sig.outputs.values()]))
    save = _backward(nodes, meta.saver_def.save_tensor_name) - served  # what a signature computes is the model's
    restore = _backward(nodes, meta.saver_def.restore_op_name) - served
    extras = {name: (SAVE_OPS if name in save else frozenset()) | (RESTORE_OPS if name in restore else frozenset())
              for name in nodes}
    save_reach, restore_reach = _reach(save, nodes, library), _reach(restore, nodes, library)
    # every function that a model node calls, and every function that is not the saver's (TensorFlow 2 may call any
    # function of the library from its object graph), takes tensor ops only
    model_reach = _reach({name for name in nodes if not extras[name]}, nodes, library) | _functions_from(
        [f for f in library if f not in save_reach | restore_reach], library)
    for name, node in nodes.items():
        if node.op not in TENSOR_OPS and node.op not in extras[name] and node.op not in library:
            raise _refuse(path, node.op, f"the graph's node {name}")
    for fname, function in library.items():
        allowed = TENSOR_OPS
        if fname not in model_reach:
            allowed |= (SAVE_OPS if fname in save_reach else frozenset()) | \
                (RESTORE_OPS if fname in restore_reach else frozenset())
        for node in function.node_def:
            if node.op not in allowed and node.op not in library:
                raise _refuse(path, node.op, f"function {fname}")


def load_saved_model(path: str):
    """``tf.saved_model.load(path)`` after :func:`check_saved_model` has found only pure tensor ops in it."""
    import tensorflow as tf

    check_saved_model(path)
    return tf.saved_model.load(path)


def check_tflite(path: str) -> None:
    """CairnError if the TFLite file ``path`` holds a TensorFlow op ("Flex" custom op) that is not a pure tensor op.

    Other custom ops (e.g. the Object Detection API's TFLite_Detection_PostProcess) are left to the interpreter,
    which runs only the ones it has kernels for.
    """
    with open(path, "rb") as f:
        data = f.read()
    if b"Flex" not in data:  # no TensorFlow op can be named in the file: nothing to parse
        return
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAsModel(data, 0)
        codes = [model.OperatorCodes(i).CustomCode() for i in range(model.OperatorCodesLength())]
    except Exception as e:  # noqa: BLE001 - a damaged flatbuffer raises anything from struct to IndexError
        raise CairnError(f"{path}: not a readable TFLite model ({type(e).__name__}: {e})") from None
    for code in codes:
        if code and code.startswith(b"Flex") and code[4:].decode("utf-8", "replace") not in TENSOR_OPS:
            raise _refuse(path, code.decode("utf-8", "replace"), "the TFLite model's operator codes",
                          "a TFLite model")

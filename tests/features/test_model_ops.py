"""A SavedModel is a program: one that reads or writes files must be refused before TensorFlow loads it."""

import numpy as np
import pytest

from pipeline.errors import CairnError

tf = pytest.importorskip("tensorflow")


def _hostile(path, secret, copy, kind: str = "embedder") -> str:
    """A SavedModel whose serving function copies the file ``secret`` to ``copy`` whenever it is called, with the
    signature of an image embedder or of an Object Detection API detector."""

    def steal():
        tf.io.write_file(str(copy), tf.io.read_file(str(secret)))

    if kind == "embedder":
        class Module(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
            def __call__(self, images):
                steal()
                return {"embedding": tf.reduce_mean(images, axis=[1, 2])}
    else:
        class Module(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
            def __call__(self, input_tensor):
                steal()
                return {"detection_boxes": tf.constant([[[0.1, 0.2, 0.6, 0.7]]]),
                        "detection_scores": tf.constant([[0.9]]), "num_detections": tf.constant([1.0])}

    module = Module()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.__call__})
    return str(path)


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("not for the model")
    return path


def test_an_embedder_that_reads_and_writes_files_is_refused_unrun(tmp_path, secret):
    from features.cnn import CnnConfig, CnnExtractor
    from features.frozen import SavedModelEmbedder

    copy = tmp_path / "copied.txt"
    path = _hostile(tmp_path / "evil", secret, copy)
    for load in (lambda: SavedModelEmbedder(path), lambda: CnnExtractor(CnnConfig(model=path))):
        with pytest.raises(CairnError) as e:
            load()
        assert path in str(e.value) and ("ReadFile" in str(e.value) or "WriteFile" in str(e.value))
        assert "code" in str(e.value)
    assert not copy.exists()  # nothing of the model ran


def test_a_detector_that_reads_and_writes_files_is_refused_unrun(tmp_path, secret):
    from features.detect import DetectConfig, load_any_detector
    from pipeline.stages.extract import check_detector

    copy = tmp_path / "copied.txt"
    path = _hostile(tmp_path / "evil", secret, copy, kind="detector")
    with pytest.raises(CairnError, match="is not a pure tensor op"):
        check_detector(DetectConfig(model=path))  # in the launching process, before any worker
    with pytest.raises(CairnError, match="is not a pure tensor op"):
        load_any_detector(path)
    assert not copy.exists()


@pytest.mark.parametrize("op", ["MatchingFiles", "SaveV2", "PrintV2"])
def test_file_ops_in_the_model_are_refused_even_those_the_saver_may_use(tmp_path, op):
    from features.model_ops import check_saved_model

    def effect():
        if op == "MatchingFiles":
            tf.io.matching_files(str(tmp_path / "*"))
        elif op == "SaveV2":  # a checkpoint write is the saver's right, not the model's
            tf.raw_ops.SaveV2(prefix=str(tmp_path / "ckpt"), tensor_names=["x"], shape_and_slices=[""],
                              tensors=[tf.constant(1.0)])
        else:
            tf.print("x", output_stream=f"file://{tmp_path / 'printed'}")

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def __call__(self, images):
            effect()
            return {"embedding": tf.reduce_mean(images, axis=[1, 2])}

    module = Module()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.__call__})
    first = "StringFormat" if op == "PrintV2" else op  # tf.print formats its string first
    with pytest.raises(CairnError, match=f"the op {first} "):
        check_saved_model(str(tmp_path / "m"))


def test_a_keras_cnn_exported_as_a_saved_model_still_loads(tmp_path):
    import keras

    from features.frozen import SavedModelEmbedder
    from features.model_ops import check_saved_model

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(keras.layers.Dropout(0.2)(x))
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "keras")
    model.export(path, verbose=False)
    check_saved_model(path)  # variables, save and restore functions included
    embedder = SavedModelEmbedder(path, preprocessing="none")
    assert embedder.input_size == 16 and embedder.dim == 5
    xb = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    expected = model(xb.astype(np.float32)).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(xb), expected, atol=1e-5)


def test_a_damaged_saved_model_pb_is_a_user_error(tmp_path):
    from features.model_ops import check_saved_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "saved_model.pb").write_bytes(b"\xff" * 40)
    with pytest.raises(CairnError, match="not a SavedModel"):
        check_saved_model(str(tmp_path / "m"))


def test_a_tflite_model_with_tensorflow_file_ops_is_refused_unrun(tmp_path, secret):
    from features.frozen import TFLiteEmbedder
    from features.model_ops import check_tflite
    from tests.conftest import PRETRAINED

    copy = tmp_path / "copied.txt"

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
        def __call__(self, images):
            tf.io.write_file(str(copy), tf.io.read_file(str(secret)))
            return tf.reduce_mean(images, axis=[1, 2])

    module = Module()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    path = tmp_path / "flex.tflite"
    path.write_bytes(converter.convert())
    with pytest.raises(CairnError, match="the op Flex(ReadFile|WriteFile) .*a TFLite model that can read"):
        TFLiteEmbedder(str(path))
    assert not copy.exists()
    if PRETRAINED.exists():  # the project's own TFLite extractor holds builtin ops only
        check_tflite(str(PRETRAINED))


def _tf1_saved_model(path, copy_on_restore=None) -> str:
    """A TensorFlow 1 SavedModel (graph, variables and a saver); with ``copy_on_restore=(secret, copy)`` its
    saver's restore op also copies a file, which TensorFlow 1 loading would run."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session() as session:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="images")
        w = tf.compat.v1.get_variable("w", [3, 4])
        y = tf.matmul(tf.reduce_mean(x, axis=[1, 2]), w)
        session.run(tf.compat.v1.global_variables_initializer())
        saver = tf.compat.v1.train.Saver()
        if copy_on_restore:
            secret, copy = copy_on_restore
            write = tf.io.write_file(str(copy), tf.io.read_file(str(secret)))
            graph.get_operation_by_name(saver.saver_def.restore_op_name)._add_control_input(write)
        builder = tf.compat.v1.saved_model.Builder(str(path))
        signature = tf.compat.v1.saved_model.predict_signature_def({"images": x}, {"embedding": y})
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature},
                                             saver=saver)
        builder.save()
    return str(path)


def test_a_tf1_saved_model_loads_but_its_saver_may_not_touch_other_files(tmp_path, secret):
    from features.frozen import SavedModelEmbedder
    from features.model_ops import check_saved_model

    assert SavedModelEmbedder(_tf1_saved_model(tmp_path / "ok"), preprocessing="none").dim == 4
    copy = tmp_path / "copied.txt"
    path = _tf1_saved_model(tmp_path / "evil", (secret, copy))
    with pytest.raises(CairnError, match="the op (ReadFile|WriteFile) "):
        check_saved_model(path)
    with pytest.raises(CairnError):
        SavedModelEmbedder(path)
    assert not copy.exists()

"""Exported .keras models load in Keras' safe mode: a file that carries Python code is refused, not run."""

import pytest

keras = pytest.importorskip("keras")


@pytest.mark.parametrize("layer", ["lambda", "tfsm"])
def test_a_keras_file_carrying_code_is_refused_unrun(tmp_path, layer):
    from features.embedding import FORMAT, VERSION
    from features.keras_io import load_with_metadata, save_with_metadata

    inputs = keras.Input((4,))
    if layer == "lambda":  # a Python lambda is stored as bytecode; loading it would run it
        outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    else:  # TFSMLayer loads a SavedModel (any graph) named in the file's config
        outputs = keras.layers.Dense(2)(inputs)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "m.keras")
    if layer == "tfsm":
        export = str(tmp_path / "sm")
        model.export(export, verbose=False)
        model = keras.Sequential([keras.Input((4,)), keras.layers.TFSMLayer(export, call_endpoint="serve")])
    save_with_metadata(model, path, {"format": FORMAT, "version": VERSION, "input_size": 4, "dim": 2})
    with pytest.raises(ValueError, match="safe_mode|unsafe|disallowed"):
        load_with_metadata(path, FORMAT, VERSION, "a Cairn embedding model", "")

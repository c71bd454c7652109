"""Files from elsewhere cannot run code or lead outside their folder (the risky rows of SECURITY.md).

Checkpoints and exports have their own tests (test_checkpoint_safety.py); here: YAML tags, prepared schemas,
model folders, ELEC heads and run names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedding_jobs.engines import EngineOptions, TransformersEngine
from embedding_jobs.model_files import ModelError
from embedding_jobs.tiny_models import save_tiny_encoder
from recsys.data.schema import PreparedSchema, SchemaError, load_schema
from recsys.experiment import load_config
from recsys.train.config import ConfigError

PAYLOAD = "!!python/object/apply:os.system ['touch {marker}']"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def test_a_yaml_tag_that_constructs_an_object_is_refused(tmp_path):
    marker = tmp_path / "ran"
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(f"name: x\ntrain:\n  epochs: {PAYLOAD.format(marker=marker)}\n")
    with pytest.raises(ConfigError, match="experiment.yaml"):
        load_config(experiment)
    schema = tmp_path / "schema.yaml"
    schema.write_text(f"name: {PAYLOAD.format(marker=marker)}\n")
    with pytest.raises(SchemaError, match="schema.yaml"):
        load_schema(schema)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    ({"vocab_file": "../../elsewhere.parquet"}, "vocabulary file"),
    ({"vocab_file": "/etc/elsewhere.parquet"}, "vocabulary file"),
    ({"name": "../../outside"}, "a name must match"),
    ({"table": "/tmp/outside"}, "a name must match"),
])
def test_a_prepared_schema_naming_paths_outside_its_folder_is_refused(tiny_prepared, tmp_path, change, message):
    _, prepared_dir, _ = tiny_prepared
    copy = tmp_path / "prepared"
    shutil.copytree(prepared_dir, copy)
    schema = json.loads((copy / "schema.json").read_text())
    schema["fields"][0].update(change)
    (copy / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(SchemaError, match=message):
        PreparedSchema.load(copy)


def test_a_model_folder_with_code_runs_none_of_it(tiny_bert, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                             "from transformers import BertModel as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    engine = TransformersEngine(EngineOptions(model=folder))  # trust_remote_code is off by default
    assert engine.embed(["a text"]).shape == (1, engine.dim)
    assert type(engine._model).__name__ == "BertModel" and not marker.exists()


def test_model_and_head_files_naming_paths_outside_their_folder_are_refused(tiny_bert, tmp_path):
    from embedding_jobs.elec_head import HEAD_CONFIG, read_head_config
    from embedding_jobs.model_files import read_model_config

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "../../elsewhere", "type": "sentence_transformers.models.Pooling"}]))
    with pytest.raises(ModelError, match="leaves the folder"):
        read_model_config(folder)
    (folder / "modules.json").unlink()
    (folder / HEAD_CONFIG).write_text(json.dumps({"input_dim": 64, "hidden_dim": 8, "rep_dim": 4, "max_length": 16,
                                                     "weights": "../elsewhere.safetensors"}))
    with pytest.raises(ModelError, match="leaves the folder"):
        read_head_config(folder)


@pytest.mark.parametrize("name", ["../outside", "/tmp/outside", "a/b", ".."])
def test_a_run_name_cannot_lead_outside_the_output_folder(name):
    with pytest.raises(ConfigError, match="a run name is"):
        load_config(None, [f"name={name}"])

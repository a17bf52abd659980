"""Hub checks shared by models, named datasets and ``hub:`` text sources: the offline switch, the
probe's failure kinds, and ``hub:ID[:config]`` sources failing at once with the fix. No network."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from unlearning.data.text import TextSource, load_texts
from unlearning.core.errors import DataError, HubProbeError, ModelNotFoundError
from unlearning.core.hub import hub_offline, probe_hub


def hub_error(cls, text: str):
    """A huggingface_hub error built without an HTTP response (its client differs across versions)."""
    error = cls.__new__(cls)
    Exception.__init__(error, text)
    return error


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face caches, whatever this machine has cached."""
    import datasets
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))


@pytest.fixture
def online(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_hub_offline_reads_the_environment_each_call(online, monkeypatch):
    assert not hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert not hub_offline() and hub_offline("TRANSFORMERS_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert hub_offline() and hub_offline("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline("HF_DATASETS_OFFLINE")


def test_probe_names_each_failure_kind(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    raised = {"gated": hub_error(GatedRepoError, "403 gated"),
              "no_revision": hub_error(RevisionNotFoundError, "404 revision"),
              "no_repo": hub_error(RepositoryNotFoundError, "404 repo"),
              "unreachable": ConnectionError("Name or service not known")}
    for kind, error in raised.items():
        def info(self, repo_id, error=error, **kwargs):
            raise error
        monkeypatch.setattr(HfApi, "dataset_info", info)
        with pytest.raises(HubProbeError) as err:
            probe_hub("some/id", "abc", repo_type="dataset")
        assert err.value.kind == kind
    reason = err.value.reason(gated="G", no_repo="R")
    assert reason == "the hub cannot be reached (ConnectionError: Name or service not known)"
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kwargs: {"id": repo_id, **kwargs})
    assert probe_hub("some/model", "v1", repo_type="model", timeout=3.0) == {"id": "some/model", "revision": "v1",
                                                                            "timeout": 3.0}


def test_gated_model_keeps_its_message(empty_caches, online, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    def model_info(self, repo_id, **kwargs):
        raise hub_error(GatedRepoError, "403 gated")

    monkeypatch.setattr(HfApi, "model_info", model_info)
    from unlearning.model.loading import resolve_model_path
    with pytest.raises(ModelNotFoundError, match=r"someone/gated-model is not a local folder; as a hub id: the "
                                                 r"repository is gated \(accept its terms and log in with "
                                                 r"`hf auth login`\)"):
        resolve_model_path("someone/gated-model")


def test_offline_hub_text_source_fails_at_once_naming_id_and_fix(empty_caches, monkeypatch):
    from huggingface_hub import HfApi

    def no_network(self, *args, **kwargs):
        raise AssertionError("offline: the hub must not be asked")

    monkeypatch.setattr(HfApi, "dataset_info", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(DataError) as err:
        load_texts(TextSource(source="hub:some/id:cfg", split="validation", revision="abc123"))
    assert time.time() - start < 20
    message = str(err.value)
    for part in ("data source 'hub:some/id:cfg'", "some/id@abc123, config 'cfg', split 'validation'",
                 "HF_HUB_OFFLINE is set", "data.<corpus>.source", "local", "HF_HOME"):
        assert part in message, part


def test_unreachable_hub_text_source_fails_before_datasets_runs(online, monkeypatch):
    import datasets
    from huggingface_hub import HfApi

    def dataset_info(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    def load_dataset(*args, **kwargs):
        raise AssertionError("datasets must not run when the probe failed")

    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"data source 'hub:some/id': some/id@main \(unpinned\), split 'train': "
                                        r"the hub cannot be reached \(ConnectionError"):
        load_texts(TextSource(source="hub:some/id"))


def test_hub_text_source_keeps_config_split_revision_column_and_limit(monkeypatch):
    import datasets
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([{"body": f"text {i}"} for i in range(5)])

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache only: no probe
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = load_texts(TextSource(source="hub:some/id:cfg", split="test", revision="abc", column="body", limit=2))
    assert calls == [("some/id", "cfg", {"split": "test", "revision": "abc"})]
    assert [r["text"] for r in rows] == ["text 0", "text 1"]
    with pytest.raises(DataError, match="has no column 'text'"):
        load_texts(TextSource(source="hub:some/id"))


def test_data_and_models_import_without_datasets():
    """The GPU machine has no ``datasets``: importing the data and model code must not need it."""
    code = ("import sys; import unlearning.data.text, unlearning.core.hub, unlearning.data.hub, unlearning.model.loading; "
            "assert 'datasets' not in sys.modules, 'datasets was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

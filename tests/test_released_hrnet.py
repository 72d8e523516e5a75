"""The released HRNet face models by name (star_jax.deploy.released.HRNET_RELEASES).

Literal values of the official README of HRNet/HRNet-Facial-Landmark-Detection (HEAD f776dbe):
the file names, their OneDrive links and the landmark counts of the four datasets. The HRNet
fixture (tests/fixtures/official_hrnet_300w, a 68-point HRNetV2-W18 saved by the official code)
stands in for the released 300W file.
"""

import hashlib
import os

import numpy as np
import pytest

from star_jax.training import model_store
from star_jax.deploy import released
from star_jax.commands import released as released_command
from star_jax.errors import CheckpointError

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "official_hrnet_300w", "HR18-300W-fixture.pth")
STAR_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                            "official_wflw_small", "checkpoint.pkl")


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  monkeypatch.setenv("STAR_JAX_CACHE", str(root))
  monkeypatch.delenv(released.MIRROR_ENV, raising=False)
  return root / "released"


def test_the_table_names_the_official_hrnet_links():
  expected = {
      "hrnet-wflw": (98, "HR18-WFLW.pth", "https://1drv.ms/u/s!AiWjZ1LamlxzdTsr_9QZCwJsn5U"),
      "hrnet-300w": (68, "HR18-300W.pth", "https://1drv.ms/u/s!AiWjZ1LamlxzeYLmza1XU-4WhnQ"),
      "hrnet-cofw": (29, "HR18-COFW.pth", "https://1drv.ms/u/s!AiWjZ1LamlxzdFIsEUQl8jgUaMk"),
      "hrnet-aflw": (19, "HR18-AFLW.pth", "https://1drv.ms/u/s!AiWjZ1Lamlxzc7xumEw810iBLTc"),
  }
  assert [n for n in released.names() if n.startswith("hrnet-")] == list(expected)
  for name, (points, file_name, url) in expected.items():
    release = released.get(name)
    assert (release.num_points, release.file_name, release.page_url) == (points, file_name, url)
    assert release.family == "hrnet" and release.width == 18
  assert released.lookup("HRNet-WFLW") is released.get("hrnet-wflw")


def test_a_missing_file_gives_the_manual_download_line(cache):
  with pytest.raises(CheckpointError) as excinfo:
    model_store.load_model("hrnet-wflw")
  message = str(excinfo.value)
  assert "\n" not in message
  assert "https://1drv.ms/u/s!AiWjZ1LamlxzdTsr_9QZCwJsn5U" in message
  assert str(cache / "HR18-WFLW.pth") in message
  assert "python -m star_jax.released register hrnet-wflw FILE" in message
  assert not os.path.exists(cache / "HR18-WFLW.pth")      # nothing was fetched


def test_register_the_fixture_and_load_it_by_name(cache, capsys):
  assert released_command.main(["register", "hrnet-300w", FIXTURE]) == 0
  assert str(cache / "HR18-300W.pth") in capsys.readouterr().out
  record = released.read_record(str(cache / "HR18-300W.pth"))
  with open(FIXTURE, "rb") as f:
    assert record["sha256"] == hashlib.sha256(f.read()).hexdigest()
  loaded = model_store.load_model("hrnet-300w")
  assert type(loaded.model).registry_name == "hrnet_w18"
  assert loaded.model.num_points == 68 and loaded.model.width == 18
  assert loaded.trained_on == "300w" and loaded.image_size == 256
  # The weights are the file's: the first convolution, OIHW -> HWIO.
  direct = model_store.load_model(FIXTURE)
  np.testing.assert_array_equal(loaded.variables["params"]["conv1"]["kernel"],
                                direct.variables["params"]["conv1"]["kernel"])


def test_a_wrong_point_count_is_refused(cache, capsys):
  with pytest.raises(SystemExit) as exit_info:
    released_command.main(["register", "hrnet-wflw", FIXTURE])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert err[0].startswith(f"error: {FIXTURE}: holds a 68-point HRNet, but 'hrnet-wflw' is the "
                           "98-point WFLW model")
  assert not os.path.exists(cache / "HR18-WFLW.pth")


def test_a_star_file_is_not_an_hrnet_release(cache):
  with pytest.raises(CheckpointError, match="not an official HRNet face-alignment state dict"):
    released.register("hrnet-wflw", STAR_FIXTURE)
  assert not os.path.exists(cache / "HR18-WFLW.pth")

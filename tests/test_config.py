from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from h3de.config import config_from_dict, load_config, save_config, to_container
from h3de.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_merge_in_order(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 8\n  spacing_mm: [2, 2, 3]\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["optim.lr=0.5", "trainer.max_epochs=7"])
    assert cfg.data.batch_size == 8  # file over default
    assert list(cfg.data.spacing_mm) == [2.0, 2.0, 3.0]
    assert cfg.optim.lr == 0.5  # override over file
    assert cfg.trainer.max_epochs == 7
    assert cfg.data.patch_size == [48, 48, 48]  # untouched default
    assert cfg.name == "exp"  # named after the file when the file does not name it


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.batchsize=2", "data.batchsize"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("data.batch_size=abc", "data.batch_size"),
        ("loss.name=l1", "loss.name"),
        ("local.design=foo", "local.design='foo'"),
        ("model.name=resnet", "model.name='resnet'"),
        ("data.spacing_mm=[1,2]", "data.spacing_mm"),
        ("data.augment.flip_prob=1.5", "data.augment.flip_prob"),
        ("optim.lr=-1", "optim.lr"),
        ("data.samples_per_epoch=0", "data.samples_per_epoch"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.max_time=1:30", "trainer.max_time"),
        ("trainer.max_time=00:24:00:00", "trainer.max_time='00:24:00:00'"),
        ("trainer.max_time=00:00:00:00", "trainer.max_time"),
        ("data.normalize=window", "data.window=.lo, hi."),
        ("data.window=[0,100]", "data.window=.0.0, 100.0. is only read by data.normalize=window"),
        ("data.percentiles=[99,1]", "data.percentiles"),
        ("data.percentiles=[0.5]", "data.percentiles"),
        ("data.percentiles=[-1,99]", "data.percentiles"),
        ("data.augment.bias_field_prob=2", "data.augment.bias_field_prob"),
        ("data.augment.bias_field_coeff=-0.1", "data.augment.bias_field_coeff"),
        ("data.augment.bias_field_degree=0", "data.augment.bias_field_degree"),
        ("data.augment.contrast_prob=-1", "data.augment.contrast_prob"),
        ("data.augment.contrast_gamma=[0,1]", "data.augment.contrast_gamma"),
        ("data.augment.contrast_gamma=[1.5,0.7]", "data.augment.contrast_gamma"),
        ("no_equals_sign", "key=value"),
        ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps must be positive, got -1"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be 0 .off. or positive, got -1"),
        (
            "model=h3de_net_anchor loss=anchor data.patch_size=[128,128,64] detection.mode=sliding_window",
            "sliding_window needs a heatmap network",
        ),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, override.split())


def test_step_and_time_budgets(tmp_path):
    cfg = load_config(None, ["trainer.max_time=01:12:00:00", "trainer.max_steps=500", "data.samples_per_epoch=250"])
    assert (cfg.trainer.max_time, cfg.trainer.max_steps, cfg.data.samples_per_epoch) == ("01:12:00:00", 500, 250)
    defaults = load_config()
    assert (defaults.trainer.max_time, defaults.trainer.max_steps, defaults.data.samples_per_epoch) == (None, -1, None)
    assert load_config(None, ["trainer.max_time=1:12:00:00"]).trainer.max_time == "1:12:00:00"  # text, as typed
    path = tmp_path / "exp.yaml"
    path.write_text("trainer:\n  max_time: 1:12:00:00\n")
    with pytest.raises(ConfigError, match="trainer.max_time.*quote it"):  # YAML files read it as base 60
        load_config(path)


def test_intensity_settings():
    cfg = load_config(None, ["data.normalize=window", "data.window=[-1000,2000]"])
    assert list(cfg.data.window) == [-1000.0, 2000.0]
    defaults = load_config().data
    assert (defaults.normalize, list(defaults.percentiles), defaults.window) == ("zscore", [0.5, 99.5], None)
    assert (defaults.augment.bias_field_prob, defaults.augment.contrast_prob) == (0.0, 0.0)


def test_section_shorthand_sets_its_name():
    cfg = load_config(None, ["logger=csv", "loss=spatial_ce", "model=unet"])
    assert (cfg.logger.name, cfg.loss.name, cfg.model.name) == ("csv", "spatial_ce", "unet")
    with pytest.raises(ConfigError, match="logger.name='tensorboard'"):
        load_config(None, ["logger=tensorboard"])


def test_base_files_layer_under_the_experiment(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\ndata:\n  batch_size: 8\n  num_workers: 3\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ndata:\n  batch_size: 2\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.data.batch_size, cfg.data.num_workers, cfg.name) == (2, 3, "parent")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*base of"):
        load_config(tmp_path / "orphan.yaml")


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "trainer:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "trainer.max_epoch" in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.batch_size=6", "logger.tags=[a,b]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    reloaded = load_config(tmp_path / "run" / "config.yaml")
    assert to_container(reloaded) == to_container(cfg)
    assert to_container(config_from_dict(to_container(cfg))) == to_container(cfg)
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_config_is_struct():
    cfg = load_config()
    assert OmegaConf.is_struct(cfg)
    with pytest.raises(ConfigAttributeError):
        cfg.data.not_a_key = 1


def test_every_experiment_file_loads():
    paths = sorted(Path(__file__).parents[1].joinpath("experiments").glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(path)
        assert cfg.name == path.stem  # each experiment names its runs after its file


def test_string_keys_keep_the_text_given_on_the_command_line():
    """YAML would read on/no/1e3 as True/False/1000.0; a key typed str (or list[str]) keeps the text."""
    cfg = load_config(
        None,
        ["name=on", "logger.group=no", "logger.project=1e3", "logger.tags=[on,no,'x y']", "logger.entity=null"],
    )
    assert (cfg.name, cfg.logger.group, cfg.logger.project) == ("on", "no", "1e3")
    assert list(cfg.logger.tags) == ["on", "no", "x y"] and cfg.logger.entity is None
    assert load_config(None, ["trainer.max_time=00:01:00:00"]).trainer.max_time == "00:01:00:00"
    numbers = load_config(None, ["optim.lr=1e3", "data.batch_size=6", "trainer.devices=2"])
    assert (numbers.optim.lr, numbers.data.batch_size, numbers.trainer.devices) == (1000.0, 6, 2)
    with pytest.raises(ConfigError, match="name"):
        load_config(None, ["name=[a, b]"])


def test_deterministic_takes_true_false_or_warn():
    assert load_config(None, ["trainer.deterministic=warn"]).trainer.deterministic == "warn"
    assert load_config(None, ["trainer.deterministic=true"]).trainer.deterministic is True
    with pytest.raises(ConfigError, match="trainer.deterministic must be true, false or warn, got 'yes please'"):
        load_config(None, ["trainer.deterministic=yes please"])

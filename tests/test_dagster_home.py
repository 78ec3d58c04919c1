"""The project's dagster.yaml: merge_dag's keys (telemetry and the onboarding modal off) are written
or updated; everything else a user put there stays."""

import yaml

from merge_dag.commands.dev import dagster_dev_command
from merge_dag.commands.home import DAGSTER_YAML, update_dagster_yaml


def test_fresh_file_turns_off_telemetry_and_the_modal(tmp_path):
    cfg = tmp_path / "dagster.yaml"
    assert update_dagster_yaml(cfg) is True
    data = yaml.safe_load(cfg.read_text())
    assert data["telemetry"] == {"enabled": False} and data["nux"] == {"enabled": False}
    assert data["concurrency"]["pools"]["default_limit"] == 1
    assert update_dagster_yaml(cfg) is False and cfg.read_text() == DAGSTER_YAML


def test_earlier_file_gets_the_missing_key_appended_and_keeps_user_edits(tmp_path):
    cfg = tmp_path / "dagster.yaml"
    earlier = (
        "# Written by merge_dag. Runs, schedules and sensor state persist here (SQLite).\n"
        "telemetry:\n  enabled: false\n# my own comment\nconcurrency:\n  pools:\n    default_limit: 3\n"
    )
    cfg.write_text(earlier)
    assert update_dagster_yaml(cfg) is True
    text = cfg.read_text()
    assert text.startswith(earlier) and "# my own comment" in text
    data = yaml.safe_load(text)
    assert data["nux"] == {"enabled": False} and data["concurrency"]["pools"]["default_limit"] == 3


def test_owned_key_with_another_value_is_set_other_keys_kept(tmp_path):
    cfg = tmp_path / "dagster.yaml"
    cfg.write_text(
        "telemetry:\n  enabled: true\nrun_retries:\n  enabled: true\n  max_retries: 2\nnux:\n  enabled: false\n"
    )
    assert update_dagster_yaml(cfg) is True
    data = yaml.safe_load(cfg.read_text())
    assert data == {
        "telemetry": {"enabled": False},
        "run_retries": {"enabled": True, "max_retries": 2},
        "nux": {"enabled": False},
    }


def test_dev_command_filters_only_the_supersession_warning(tmp_path):
    cmd = dagster_dev_command(tmp_path, "127.0.0.1", "3001")
    assert cmd[-7:] == ["dev", "-w", str(tmp_path / "workspace.yaml"), "-h", "127.0.0.1", "-p", "3001"]
    assert "is superseded and its usage is discouraged" in cmd[2] and "category=FutureWarning" in cmd[2]

"""The SLURM launcher config composes (it cannot launch here: no SLURM)."""

import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (a declared dependency: fail, never skip)

from tests.conftest import compose_config


def test_slurm_launcher_config_composes_with_multi_node_ddp(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ift.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4
    assert compose_config("train", ["trainer=ddp", "trainer.num_nodes=2"], tmp_path).trainer.num_nodes == 2

"""One of two processes that load a Hugging Face checkpoint onto one 8-device mesh and
export it again (run by tests/test_hf.py::test_two_process_export)."""

import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
os.environ["KERAS_BACKEND"] = "jax"

import jax


def main(process_id: int, port: str, source: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import kithara

    model = kithara.KerasHubModel.from_preset(source, sharding="fsdp")
    if model.mesh.devices.size != 8:
        raise SystemExit(f"expected an 8-device mesh over two processes, got {model.mesh.devices.size}")
    model.save_in_hf_format(out, max_shard_size=20_000)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])

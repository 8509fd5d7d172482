"""Every parity tolerance of the project, in one table.

Relative figures: forward outputs compare max|a-b| / max|ref|; gradients and parameter trees compare
relative L2 error ||a-b|| / ||ref||.
"""

TOLERANCES = {
    "forward": 1e-5,  # any network forward, fp32, highest matmul precision
    "gradient": 1e-4,  # grads of a scalar of the output w.r.t. all params, relative L2
    "loss": 1e-5,  # training loss, same batch/noise/timesteps, relative
    "trajectory_loss": 1e-4,  # per-update loss over 20 optimizer updates, relative
    "trajectory_params": 1e-4,  # final params / EMA params after 20 updates, relative L2
    "sharded": 1e-5,  # mesh data=4 x fsdp=2 against 1 device
    "bf16_loss": 1e-2,  # bf16 compute against fp32
    "sampling": 1e-4,  # pipeline outputs, max abs difference, fp32
}

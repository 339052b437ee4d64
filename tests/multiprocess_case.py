"""One of two processes of `test_sharding.py`'s multi-host test, on localhost.

`python tests/multiprocess_case.py PROCESS_ID PORT`: two processes with 2 forced CPU
devices each form one mesh of 4 through `jax.distributed.initialize`; each holds its
half of the batch, runs 3 K-FAC steps through `eqx_curv.data_parallel`, and prints the
largest difference from the same steps on one device.
"""

import os
import sys


os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax


pid = int(sys.argv[1])
jax.distributed.initialize(
    coordinator_address=f"localhost:{sys.argv[2]}", num_processes=2, process_id=pid
)
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import eqx_curv  # noqa: E402


mesh = jax.make_mesh(
    (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
)
sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
model = eqx.nn.MLP(6, 6, 6, 2, key=jax.random.key(0))
x = np.asarray(jax.random.normal(jax.random.key(1), (16, 6)))
y = np.asarray(jax.random.randint(jax.random.key(2), (16,), 0, 6))
loss = eqx_curv.SoftmaxCrossEntropy()
# The factors from the whole batch: a sub-batch would be each device's first
# examples, another sample than one device's first examples (as in sharded_cases).
opt = eqx_curv.KFAC(inverse_every=2, statistics_batch=1.0)
rows = slice(8 * pid, 8 * pid + 8)
gx = jax.make_array_from_process_local_data(sh, x[rows])
gy = jax.make_array_from_process_local_data(sh, y[rows])
par = eqx_curv.data_parallel(opt, mesh)
m, s = model, par.init(model)
step = eqx.filter_jit(par.step)
for i in range(3):
    m, s, info = step(m, s, loss, gx, gy, key=jax.random.key(10 + i))
m1, s1 = model, opt.init(model)
step1 = eqx.filter_jit(opt.step)
for i in range(3):
    m1, s1, _ = step1(
        m1, s1, loss, jnp.asarray(x), jnp.asarray(y), key=jax.random.key(10 + i)
    )
d = max(
    float(np.max(np.abs(np.asarray(a.addressable_data(0)) - np.asarray(b))))
    for a, b in zip(
        jax.tree.leaves(eqx.filter(m, eqx.is_array)),
        jax.tree.leaves(eqx.filter(m1, eqx.is_array)),
    )
)
print(pid, "max param difference", d, flush=True)

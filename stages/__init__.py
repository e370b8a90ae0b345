"""One module per stage; each is a thin main(): parse args -> load config -> call pipeline -> report.

Thread policy, chosen here because it must be set before torch (and its OpenMP runtime) is imported: idle OpenMP
threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), so torch's intra-op threads do not steal the cores of
loader workers and of other jobs on a shared machine. Measured on 2 cores (issue 13): 30 tiny steps with one
competing process took 76.1 s with spinning threads, 51.4 s with passive ones, 48.7 s with one thread. A value the
user set wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

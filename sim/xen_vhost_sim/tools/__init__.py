"""What runs on the simulated Xen host rather than in it: ``make demo`` (demo.py), ``make bench``
(bench.py, with bench_map.py and bench_shadow.py), the fault benchmark (faultbench.py). Tools may
import anything of the daemon; the simulator itself does not."""

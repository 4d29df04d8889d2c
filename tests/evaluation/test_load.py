"""LoadMeter sees another process using a core while a segment is timed."""
import subprocess
import sys
import time

import pytest

from spikingbrain.evaluation.load import LoadMeter


def test_a_busy_process_marks_the_segment():
    meter = LoadMeter()
    if not meter.available:
        pytest.skip("no /proc")
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)  # let it start
        with meter.segment("sleeping while another process spins"):
            time.sleep(1.0)
    finally:
        busy.kill()
        busy.wait()
    seg = meter.segments[0]
    assert seg["other_cores"] > 0.5, seg  # one core spun the whole second (minus the slack)
    assert not meter.ok(0.25)
    summary = meter.summary(0.25)
    assert summary["valid"] is False and summary["segments_over"][0]["name"] == seg["name"]

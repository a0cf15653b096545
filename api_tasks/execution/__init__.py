"""Running a job in a worker: the runner, the limits gate, the watchdog, and the
reaper and scheduler that keep lost and waiting jobs moving."""

"""Fake modules.shared: the ``state`` object with A1111's fields and methods."""


class State:
    interrupted = False
    job = ""
    job_no = 0
    job_count = 0
    textinfo = None

    def __init__(self):
        self.jobs = []  # every begin(job=...) seen, for the tests

    def begin(self, job="(unknown)"):
        self.job, self.job_no, self.job_count, self.interrupted, self.textinfo = job, 0, -1, False, None
        self.jobs.append(job)

    def end(self):
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True


state = State()

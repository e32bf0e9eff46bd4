"""Fake modules.shared: the ``state`` object with A1111's fields and methods, ``opts`` and ``OptionInfo``."""


class State:
    interrupted = False
    job = ""
    job_no = 0
    job_count = 0
    textinfo = None
    current_image = None

    def __init__(self):
        self.jobs = []  # every begin(job=...) seen, for the tests
        self.images = []  # every assign_current_image(...) seen

    def begin(self, job="(unknown)"):
        self.job, self.job_no, self.job_count, self.interrupted, self.textinfo = job, 0, -1, False, None
        self.jobs.append(job)

    def end(self):
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image
        self.images.append(image)


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, section=None, **kw):
        self.default, self.label, self.section = default, label, section
        self.component, self.component_args = component, component_args


class Options:
    def __init__(self):
        self.data = {"sd_model_checkpoint": None}
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in ("data", "data_labels"):
            raise AttributeError(key)
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None


state = State()
opts = Options()

"""Fake modules.progress: the webui's task queue that /internal/progress reports."""

queued, started, finished = [], [], []
current_task = None


def add_task_to_queue(id_job):
    queued.append(id_job)


def start_task(id_task):
    global current_task
    current_task = id_task
    started.append(id_task)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished.append(id_task)

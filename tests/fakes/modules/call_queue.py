"""Fake modules.call_queue: the GPU lock every generation takes."""

import threading

queue_lock = threading.Lock()

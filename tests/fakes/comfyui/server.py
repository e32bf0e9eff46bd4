"""Fake server: PromptServer.instance.send_sync records the messages a node sends to the browser."""


class PromptServer:
    instance = None

    def __init__(self):
        PromptServer.instance = self
        self.messages = []
        self.client_id = "test-client"

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

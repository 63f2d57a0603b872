"""The APIs of the servers xiaozhi-esp32-server already calls: FunASR's WebSocket
protocol, OpenAI's transcription API and voiceprint-api, answered by the cluster."""

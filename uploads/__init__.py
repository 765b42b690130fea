"""Everything after a download completes: the upload manager, rclone and Telegram targets, and
media facts (ffprobe/ffmpeg)."""

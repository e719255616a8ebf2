"""A person's notifications: the inbox, preferences, watched workflows, and push to
their devices (Web Push with VAPID, FCM HTTP v1)."""

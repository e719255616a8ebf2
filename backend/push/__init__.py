"""A person's notifications: the inbox, preferences, watched workflows, and push to
their devices (Web Push with VAPID, FCM HTTP v1). Importing the package hooks the
notices other domains cause (an invitation reaches the invited person's inbox)."""

from backend.push import hooks as hooks

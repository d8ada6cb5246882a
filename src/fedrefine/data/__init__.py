"""LightningDataModules and the data they read: chat conversations (OpenHermes-2.5) to train on,
multiple-choice questions (OpenBookQA) to evaluate on, opened by hub id or local file."""

//! Turns: answering a turn of an agent's conversation (where it continues, its prompt, its
//! generation) and committing it to the transcript; reading and deleting turns.

use std::sync::Arc;
use std::time::Instant;

use engine::{GenerateOptions, Message, Role, StopReason};

use super::{Agent, AgentPool, Continue, LoadReport, Reply, Slot, Timings, lock};
use crate::backend::Backend;
use crate::error::{PoolError, Result};
use crate::files::{self, AgentInfo};
use crate::transcript::{Entry, Parent, TRANSCRIPT_FILE, Transcript, Turn, Usage};

impl<B: Backend + ?Sized> AgentPool<B> {
    /// Runs one turn of agent `id`: `user_input` is answered in the context of the agent's
    /// system prompt and its newest conversation, streaming text to `on_text`.
    ///
    /// A cold agent is made hot first (its cache loaded, or rebuilt from the transcript:
    /// see [`Reply::rebuilt`]). When this returns `Ok`, the user's message and the reply are
    /// fsynced to the transcript as one line; the cache save may be deferred. Text streamed
    /// to `on_text` before an `Err` belongs to no turn. The agent is pinned (never evicted)
    /// while this runs; calls on one agent are serialized, calls on different agents are not.
    pub fn generate(
        &self,
        id: &str,
        user_input: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        self.respond(
            id,
            Continue::Head,
            vec![Message::user(user_input)],
            options,
            on_text,
        )
    }

    /// Runs one turn of agent `id` continuing its conversation where `at` says, with
    /// `messages` (see [`Continue`] for what they are), streaming text to `on_text`. The new
    /// turn is durable when this returns `Ok`, as with [`AgentPool::generate`]; an `Err`
    /// (a cancelled generation included) commits nothing.
    pub fn respond(
        &self,
        id: &str,
        at: Continue,
        messages: Vec<Message>,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        let slot = self.slot(id)?;
        let reply = {
            let (mut agent, info) = self.lock_agent(&slot)?;
            let load = self.activate(&slot, info, &mut agent)?;
            // Make room before the cache grows; this agent is locked, so it stays.
            self.enforce();
            self.turn_locked(
                &slot, info, &mut agent, load, at, messages, options, on_text,
            )?
        };
        self.enforce();
        Ok(reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn turn_locked(
        &self,
        slot: &Arc<Slot>,
        info: &AgentInfo,
        agent: &mut Agent,
        load: LoadReport,
        at: Continue,
        messages: Vec<Message>,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        let id = slot.id.as_str();
        let fresh_system = agent.fresh_system.take();
        let transcript = agent.transcript.get_or_insert_with(Transcript::default);
        let (parent, matched_messages, mut input) = match at {
            Continue::Head => (transcript.head(), 0, messages),
            Continue::At(parent) => {
                check_point(transcript, id, parent)?;
                (parent, 0, messages)
            }
            Continue::Match => {
                let (parent, used) = Self::match_messages(info, transcript, &messages);
                let mut messages = messages;
                (parent, used, messages.split_off(used))
            }
        };
        let instructions = match at {
            Continue::Match => None,
            Continue::Head | Continue::At(_) => {
                Self::take_instructions(info, transcript, parent, &mut input)
            }
        };
        if input.is_empty() {
            return Err(PoolError::NoInput { id: id.to_owned() });
        }
        let mut conversation =
            Self::conversation(info, transcript, parent, instructions.as_deref());
        conversation.extend(input.iter().cloned());
        let prompt = self
            .backend
            .chat_tokens(&conversation, true)
            .map_err(|e| PoolError::engine(id, e))?;
        let options = self.fit(id, &prompt, options)?;
        let Some(cache) = agent.cache.as_mut() else {
            // activate() just made it hot and only this thread can evict it.
            return Err(self.unknown(id));
        };
        let generation = self.backend.generate(cache, &prompt, &options, on_text);
        agent.dirty = true;
        self.record(slot, agent);
        let generation = generation.map_err(|e| PoolError::engine(id, e))?;
        let mut reused_tokens = generation.reused_tokens;
        if let Some(tokens) = fresh_system
            && reused_tokens >= tokens
        {
            // Computed for this conversation a moment ago, not reused from earlier work.
            reused_tokens -= tokens;
        }

        let commit_started = Instant::now();
        let path = self.agent_dir(id).join(TRANSCRIPT_FILE);
        let transcript = agent.transcript.get_or_insert_with(Transcript::default);
        let index = transcript.turns.len() as u64;
        let turn = Turn {
            index,
            unix_ms: files::now_unix_ms(),
            parent,
            input,
            reply: generation.text.clone(),
            // Cut at a stop sequence, the tokens spell more than the reply.
            reply_tokens: if generation.stop == StopReason::StopSequence {
                Vec::new()
            } else {
                generation.tokens.clone()
            },
            instructions,
            usage: Some(Usage {
                prompt_tokens: generation.prompt_tokens,
                reused_tokens,
                output_tokens: generation.tokens.len(),
            }),
        };
        let entry = Entry::Turn(turn);
        // Shared: committed on the store first, with the cache holding this turn.
        self.commit_line(id, info, agent, &entry, "committing the turn")?;
        agent
            .transcript
            .get_or_insert_with(Transcript::default)
            .append(&path, entry)?;
        let commit = commit_started.elapsed();
        lock(&self.state).counters.turns += 1;
        if self.config.save_every_turn {
            // The turn is durable already; a failed save is counted and retried later.
            let _ = self.save_locked(id, agent);
            self.record(slot, agent);
        }
        Ok(Reply {
            text: generation.text,
            tokens: generation.tokens,
            first_logits: generation.first_logits,
            turn: Some(index),
            parent,
            matched_messages,
            prompt_tokens: generation.prompt_tokens,
            reused_tokens,
            stop: generation.stop,
            timings: Timings {
                load: load.elapsed,
                prefill: generation.prefill,
                decode: generation.decode,
                commit,
            },
            resumed_from_disk: load.resumed_from_disk,
            rebuilt: load.rebuilt,
            transcript_repair: load.transcript_repair,
        })
    }

    /// Removes a leading system message from a turn's `input`: that turn's instructions, unless
    /// they are the agent's system prompt the conversation opens with anyway.
    fn take_instructions(
        info: &AgentInfo,
        transcript: &Transcript,
        parent: Parent,
        input: &mut Vec<Message>,
    ) -> Option<String> {
        if input.first().is_none_or(|m| m.role != Role::System) {
            return None;
        }
        let text = input.remove(0).content;
        let opens_with_it =
            transcript.path(parent).0 == Parent::System && text == info.system_prompt;
        (!opens_with_it).then_some(text)
    }

    /// The deepest point of the transcript's tree whose conversation `messages` start with,
    /// and how many messages that covers. Among several matching turns the newest wins.
    fn match_messages(
        info: &AgentInfo,
        transcript: &Transcript,
        messages: &[Message],
    ) -> (Parent, usize) {
        let same = |a: &Message, b: &Message| a.role == b.role && a.content == b.content;
        let (mut at, mut used) = match messages.first() {
            Some(m) if m.role == Role::System && m.content == info.system_prompt => {
                (Parent::System, 1)
            }
            _ => (Parent::Bare, 0),
        };
        'walk: loop {
            let rest = &messages[used..];
            for child in transcript.children(at) {
                let n = child.input.len();
                let matches = rest.len() > n
                    && rest.iter().zip(&child.input).all(|(a, b)| same(a, b))
                    && rest[n].role == Role::Assistant
                    && rest[n].content == child.reply;
                if matches {
                    at = Parent::Turn(child.index);
                    used += n + 1;
                    continue 'walk;
                }
            }
            return (at, used);
        }
    }

    /// `options` with `max_tokens` cut to the room the context leaves after `prompt`; a prompt
    /// that fills the context is an error.
    pub(super) fn fit(
        &self,
        id: &str,
        prompt: &[u32],
        options: &GenerateOptions,
    ) -> Result<GenerateOptions> {
        let max = self.backend.context_len();
        if prompt.len() >= max {
            return Err(PoolError::engine(
                id,
                engine::EngineError::ContextOverflow {
                    needed: prompt.len() + 1,
                    max,
                },
            ));
        }
        let mut options = options.clone();
        options.max_tokens = options.max_tokens.min(max - prompt.len());
        Ok(options)
    }

    /// Turn `index` of agent `id`, unless it was deleted.
    pub fn turn(&self, id: &str, index: u64) -> Result<Turn> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        let empty = Transcript::default();
        live_turn(agent.transcript.as_ref().unwrap_or(&empty), id, index).cloned()
    }

    /// The system prompt turn `index` of agent `id` was answered with, if its conversation had
    /// one: the turn's own instructions, else the system message its conversation opens with
    /// (the agent's, or the first message of a bare conversation). Deleted turns before it
    /// still count as its history; a deleted or unknown `index` is [`PoolError::UnknownTurn`].
    pub fn turn_system_prompt(&self, id: &str, index: u64) -> Result<Option<String>> {
        let slot = self.slot(id)?;
        let (mut agent, info) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        let empty = Transcript::default();
        let transcript = agent.transcript.as_ref().unwrap_or(&empty);
        let turn = live_turn(transcript, id, index)?;
        let history =
            Self::conversation(info, transcript, turn.parent, turn.instructions.as_deref());
        let first = history.iter().chain(&turn.input).next();
        Ok(first
            .filter(|m| m.role == Role::System && !m.content.is_empty())
            .map(|m| m.content.clone()))
    }

    /// The whole conversation a turn continuing agent `id` at `at` with `messages` is
    /// prompted with, exactly as [`AgentPool::respond`] with [`Continue::At`] renders it (a
    /// leading system message is that turn's instructions): what a client continuing from
    /// `at` without writing to the agent sends to [`AgentPool::respond_detached`]. A deleted or
    /// unknown turn is [`PoolError::UnknownTurn`].
    pub fn conversation_at(
        &self,
        id: &str,
        at: Parent,
        mut messages: Vec<Message>,
    ) -> Result<Vec<Message>> {
        let slot = self.slot(id)?;
        let (mut agent, info) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        let empty = Transcript::default();
        let transcript = agent.transcript.as_ref().unwrap_or(&empty);
        check_point(transcript, id, at)?;
        let instructions = Self::take_instructions(info, transcript, at, &mut messages);
        let mut conversation = Self::conversation(info, transcript, at, instructions.as_deref());
        conversation.extend(messages);
        Ok(conversation)
    }

    /// Deletes turn `index` of agent `id`, durably: it can no longer be continued from or
    /// read. The turns after it keep their own history (a transcript is append-only: the
    /// deletion is a line of its own).
    pub fn delete_turn(&self, id: &str, index: u64) -> Result<()> {
        let slot = self.slot(id)?;
        let (mut agent, info) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        let path = self.agent_dir(id).join(TRANSCRIPT_FILE);
        live_turn(
            agent.transcript.get_or_insert_with(Transcript::default),
            id,
            index,
        )?;
        let entry = Entry::Deleted(index);
        self.commit_line(
            id,
            info,
            &mut agent,
            &entry,
            "committing the deletion of the turn",
        )?;
        agent
            .transcript
            .get_or_insert_with(Transcript::default)
            .append(&path, entry)
    }

    /// Agent `id`'s turns, oldest first (reading the transcript if it was not read yet).
    pub fn transcript(&self, id: &str) -> Result<Vec<Turn>> {
        let slot = self.slot(id)?;
        let (mut agent, _) = self.lock_agent(&slot)?;
        self.ensure_transcript(id, &mut agent)?;
        Ok(agent
            .transcript
            .as_ref()
            .map(|t| t.turns.clone())
            .unwrap_or_default())
    }
}

/// Turn `index` of agent `id`'s `transcript`, or [`PoolError::UnknownTurn`] when it was
/// deleted or never written.
fn live_turn<'t>(transcript: &'t Transcript, id: &str, index: u64) -> Result<&'t Turn> {
    transcript
        .live(index)
        .ok_or_else(|| PoolError::UnknownTurn {
            id: id.to_owned(),
            index,
        })
}

/// Checks that a conversation can be continued at `at`: a turn there must be live.
fn check_point(transcript: &Transcript, id: &str, at: Parent) -> Result<()> {
    if let Parent::Turn(index) = at {
        live_turn(transcript, id, index)?;
    }
    Ok(())
}

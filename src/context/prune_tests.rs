//! Pruning, with the exact bytes each message becomes.

use serde_json::value::RawValue;
use serde_json::Value;

use super::super::apis::{messages_roles, responses_roles, role_of};
use super::*;

/// Prunes raw chat messages; the result and every message as it would be forwarded.
fn run(msgs: &[String]) -> (Pruned, Vec<String>) {
    run_as(msgs, |values| values.iter().map(role_of).collect())
}

/// The same, with the roles one API's planner sees (`apis::messages_roles`, …).
fn run_as(msgs: &[String], roles_of: fn(&[Value]) -> Vec<Role>) -> (Pruned, Vec<String>) {
    let raws: Vec<&RawValue> = msgs
        .iter()
        .map(|m| serde_json::from_str::<&RawValue>(m).expect("raw message"))
        .collect();
    let values: Vec<Value> = msgs
        .iter()
        .map(|m| serde_json::from_str(m).expect("message"))
        .collect();
    let roles = roles_of(&values);
    let p = prune(&raws, &values, &roles);
    let out: Vec<String> = msgs
        .iter()
        .zip(&p.messages)
        .map(|(m, r)| r.clone().unwrap_or_else(|| m.clone()))
        .collect();
    for m in &out {
        serde_json::from_str::<Value>(m).expect("valid JSON after pruning");
    }
    (p, out)
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("quote")
}

/// A file of 660 bytes, as a tool would print it.
fn file() -> String {
    "let a = 1;\n".repeat(60)
}

const MARK_660: &str = "[llm-warden: 660 bytes pruned here; the same content appears again later in this conversation]";

fn call(id: &str) -> String {
    format!(
        r#"{{"role":"assistant","content":"","tool_calls":[{{"id":"{id}","type":"function","function":{{"name":"read_file","arguments":"{{\"path\":\"src/main.rs\"}}"}}}}]}}"#
    )
}

fn result(id: &str, content: &str) -> String {
    // Spaces and key order of the client's own writing, kept.
    format!(
        r#"{{"role": "tool", "content": {}, "tool_call_id": "{id}", "name": "read_file"}}"#,
        q(content)
    )
}

/// A tool loop that reads the same file three times, then the user's next turn.
fn tool_loop() -> Vec<String> {
    vec![
        r#"{"role":"system","content":"You are a coding agent."}"#.to_string(),
        r#"{"role":"user","content":"fix the bug in main"}"#.to_string(),
        call("c1"),
        result("c1", &file()),
        call("c2"),
        result("c2", &file()),
        call("c3"),
        result("c3", &file()),
        r#"{"role":"assistant","content":"The bug is on line 3."}"#.to_string(),
        r#"{"role":"user","content":"fix it"}"#.to_string(),
    ]
}

#[test]
fn markers_are_fixed_text() {
    assert_eq!(duplicate_marker(4213), "[llm-warden: 4,213 bytes pruned here; the same content appears again later in this conversation]");
    assert_eq!(duplicate_marker(512), "[llm-warden: 512 bytes pruned here; the same content appears again later in this conversation]");
    assert_eq!(duplicate_marker(1_234_567), "[llm-warden: 1,234,567 bytes pruned here; the same content appears again later in this conversation]");
    assert_eq!(
        image_marker(1),
        "[llm-warden: 1 image removed; already answered]"
    );
    assert_eq!(
        image_marker(3),
        "[llm-warden: 3 images removed; already answered]"
    );
}

#[test]
fn a_file_read_three_times_keeps_only_the_last_read_whole() {
    let msgs = tool_loop();
    let (p, out) = run(&msgs);
    assert_eq!(
        out[3],
        r#"{"role": "tool", "content": "[llm-warden: 660 bytes pruned here; the same content appears again later in this conversation]", "tool_call_id": "c1", "name": "read_file"}"#
    );
    assert_eq!(
        out[5],
        r#"{"role": "tool", "content": "[llm-warden: 660 bytes pruned here; the same content appears again later in this conversation]", "tool_call_id": "c2", "name": "read_file"}"#
    );
    // The third read, the calls, the system message and the last turn: byte for byte.
    for i in [0, 1, 2, 4, 6, 7, 8, 9] {
        assert_eq!(p.messages[i], None, "message {i} unchanged");
        assert_eq!(out[i], msgs[i]);
    }
    assert_eq!((p.duplicates, p.images), (2, 0));
    assert_eq!(
        p.bytes,
        2 * (msgs[3].len() - out[3].len()) as u64,
        "the bytes the two reads lost"
    );
}

#[test]
fn a_copy_with_other_line_endings_and_trailing_spaces_is_the_same_content() {
    let crlf = format!("\n{}  \r\n\r\n", file().replace('\n', " \r\n"));
    let msgs = vec![
        r#"{"role":"user","content":"read it"}"#.to_string(),
        call("c1"),
        result("c1", &crlf),
        call("c2"),
        result("c2", &file()),
        r#"{"role":"user","content":"and now?"}"#.to_string(),
    ];
    let (p, out) = run(&msgs);
    // The marker gives the size of the copy it stands for (its own bytes).
    let mark = duplicate_marker(crlf.len());
    assert_eq!(
        out[2],
        format!(
            r#"{{"role": "tool", "content": {}, "tool_call_id": "c1", "name": "read_file"}}"#,
            q(&mark)
        )
    );
    assert_eq!(out[4], msgs[4]);
    assert_eq!(p.duplicates, 1);
    // A different file is not a copy.
    let other = file().replace("a = 1", "a = 2");
    let msgs = vec![
        result("c1", &file()),
        result("c2", &other),
        r#"{"role":"user","content":"and now?"}"#.to_string(),
    ];
    assert!(!run(&msgs).0.changed());
}

#[test]
fn the_last_turn_and_system_messages_are_never_changed_but_count_as_later_copies() {
    let f = file();
    let msgs = vec![
        format!(r#"{{"role":"system","content":{}}}"#, q(&f)),
        format!(r#"{{"role":"user","content":{}}}"#, q(&f)),
        r#"{"role":"assistant","content":"ok"}"#.to_string(),
        // The last turn: the user pastes the file, a tool prints it, again.
        format!(r#"{{"role":"user","content":{}}}"#, q(&f)),
        call("c9"),
        result("c9", &f),
    ];
    let (p, out) = run(&msgs);
    assert_eq!(
        out[1],
        format!(r#"{{"role":"user","content":{}}}"#, q(MARK_660))
    );
    for i in [0, 2, 3, 4, 5] {
        assert_eq!(out[i], msgs[i], "message {i}");
    }
    assert_eq!(p.duplicates, 1);
    // With no user message, nothing is older than the turn being answered.
    let msgs = vec![result("c1", &f), result("c2", &f)];
    assert!(!run(&msgs).0.changed());
}

#[test]
fn content_below_the_threshold_is_never_pruned() {
    let small = "x".repeat(MIN_BYTES - 1);
    let large = "x".repeat(MIN_BYTES);
    for (text, pruned) in [(&small, false), (&large, true)] {
        let msgs = vec![
            format!(r#"{{"role":"user","content":{}}}"#, q(text)),
            format!(r#"{{"role":"assistant","content":{}}}"#, q(text)),
            r#"{"role":"user","content":"again"}"#.to_string(),
        ];
        let (p, out) = run(&msgs);
        assert_eq!(p.changed(), pruned, "{} bytes", text.len());
        if pruned {
            assert_eq!(
                out[0],
                r#"{"role":"user","content":"[llm-warden: 512 bytes pruned here; the same content appears again later in this conversation]"}"#
            );
            assert_eq!(out[1], msgs[1], "the later copy stays");
        }
    }
}

#[test]
fn tool_call_arguments_are_neither_pruned_nor_copies() {
    let f = file();
    let edit = format!(
        r#"{{"role":"assistant","content":"","tool_calls":[{{"id":"e1","type":"function","function":{{"name":"edit_file","arguments":{}}}}}]}}"#,
        q(&serde_json::json!({"path": "a.rs", "text": f}).to_string())
    );
    let msgs = vec![
        r#"{"role":"user","content":"edit"}"#.to_string(),
        edit.clone(),
        result("e1", "done"),
        edit,
        result("e1", &f),
        r#"{"role":"user","content":"next"}"#.to_string(),
    ];
    assert!(!run(&msgs).0.changed());
}

#[test]
fn ollama_images_answered_are_removed_and_said_in_the_content() {
    let img = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
    let msgs = vec![
        format!(
            r#"{{"role":"user","content":"what is in this picture?","images":["{img}","{img}"]}}"#
        ),
        r#"{"role":"assistant","content":"A red dot."}"#.to_string(),
        // `images` first, no content.
        format!(r#"{{ "images": ["{img}"], "role":"user" }}"#),
        r#"{"role":"assistant","content":"Another dot."}"#.to_string(),
        // Not answered yet: the last turn keeps its image.
        format!(r#"{{"role":"user","content":"and this one?","images":["{img}"]}}"#),
    ];
    let (p, out) = run(&msgs);
    assert_eq!(
        out[0],
        r#"{"role":"user","content":"what is in this picture?\n[llm-warden: 2 images removed; already answered]"}"#
    );
    assert_eq!(
        out[2],
        r#"{ "content":"[llm-warden: 1 image removed; already answered]", "role":"user" }"#
    );
    assert_eq!(out[4], msgs[4]);
    assert_eq!((p.duplicates, p.images), (0, 3));
    // A picture no assistant message has answered yet (two user messages in a row) stays.
    let msgs = vec![
        format!(r#"{{"role":"user","content":"look","images":["{img}"]}}"#),
        r#"{"role":"user","content":"well?"}"#.to_string(),
    ];
    assert!(!run(&msgs).0.changed());
}

#[test]
fn openai_image_parts_answered_become_text_parts() {
    let url = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ";
    let msgs = vec![
        format!(
            r#"{{"role":"user","content":[{{"type":"text","text":"what is this?"}}, {{"type":"image_url","image_url":{{"url":"{url}"}}}}]}}"#
        ),
        r#"{"role":"assistant","content":"A dot."}"#.to_string(),
        r#"{"role":"user","content":"thanks"}"#.to_string(),
    ];
    let (p, out) = run(&msgs);
    assert_eq!(
        out[0],
        r#"{"role":"user","content":[{"type":"text","text":"what is this?"}, {"text":"[llm-warden: 1 image removed; already answered]","type":"text"}]}"#
    );
    assert_eq!(p.images, 1);
}

#[test]
fn a_repeated_text_part_is_replaced_inside_its_part() {
    let f = file();
    let msgs = vec![
        format!(
            r#"{{"role":"user","content":[{{"type":"text","text":"here:"}},{{"type":"text","text":{},"cache_control":{{"type":"ephemeral"}}}}]}}"#,
            q(&f)
        ),
        format!(r#"{{"role":"assistant","content":{}}}"#, q(&f)),
        r#"{"role":"user","content":"ok"}"#.to_string(),
    ];
    let (p, out) = run(&msgs);
    assert_eq!(
        out[0],
        format!(
            r#"{{"role":"user","content":[{{"type":"text","text":"here:"}},{{"type":"text","text":{},"cache_control":{{"type":"ephemeral"}}}}]}}"#,
            q(MARK_660)
        )
    );
    assert_eq!(p.duplicates, 1);
}

#[test]
fn one_more_turn_leaves_the_messages_already_pruned_byte_for_byte() {
    let first = tool_loop();
    let (_, a) = run(&first);
    let mut next = first.clone();
    next.extend([
        call("c4"),
        result("c4", &file()),
        r#"{"role":"assistant","content":"Fixed."}"#.to_string(),
        r#"{"role":"user","content":"thanks"}"#.to_string(),
    ]);
    let (p, b) = run(&next);
    // What was pruned before is pruned to the same bytes; the previous last read now has a
    // later copy and becomes the same marker; the newest read stays whole.
    assert_eq!(&b[..7], &a[..7]);
    assert_eq!(b[7], b[5].replace("c2", "c3"));
    assert_eq!(b[11], next[11]);
    assert_eq!(p.duplicates, 3);
    // And the same conversation prunes to the same bytes every time.
    assert_eq!(run(&next).1, b);
}

#[test]
fn in_one_tool_loop_the_earlier_reads_are_older_turns() {
    // A coding agent's loop after one user message: the file is read, edited elsewhere,
    // read again and again. The earlier reads are turns the model has acted on; the last
    // call and its result, and the user's task, stay as they are.
    let f = file();
    let task = r#"{"role":"user","content":"fix the bug in a.rs"}"#.to_string();
    let msgs = vec![
        task.clone(),
        call("r1"),
        result("r1", &f),
        call("r2"),
        result("r2", &f),
        call("r3"),
        result("r3", &f),
    ];
    let (p, out) = run(&msgs);
    let pruned = |id: &str| {
        format!(
            r#"{{"role": "tool", "content": {}, "tool_call_id": "{id}", "name": "read_file"}}"#,
            q(MARK_660)
        )
    };
    assert_eq!(out[2], pruned("r1"));
    assert_eq!(out[4], pruned("r2"));
    for i in [0, 1, 3, 5, 6] {
        assert_eq!(out[i], msgs[i], "message {i}");
    }
    assert_eq!(p.duplicates, 2);
}

const IMAGE_MARK: &str = "[llm-warden: 1 image removed; already answered]";
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ";

#[test]
fn anthropic_image_blocks_answered_become_text_blocks_also_in_tool_results() {
    let image = format!(
        r#"{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{PNG}"}}}}"#
    );
    let msgs = vec![
        format!(r#"{{"role":"user","content":[{{"type":"text","text":"what is this?"}}, {image}]}}"#),
        r#"{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"screenshot","input":{}}]}"#.to_string(),
        format!(
            r#"{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t1","content":[{{"type":"text","text":"the screen"}},{image}],"is_error":false}}]}}"#
        ),
        r#"{"role":"assistant","content":"A cat on a screen."}"#.to_string(),
        // The last user message keeps its image: not answered yet.
        format!(r#"{{"role":"user","content":[{{"type":"text","text":"and this?"}},{image}]}}"#),
    ];
    let (p, out) = run_as(&msgs, messages_roles);
    let text = format!(r#"{{"text":"{IMAGE_MARK}","type":"text"}}"#);
    assert_eq!(
        out[0],
        format!(
            r#"{{"role":"user","content":[{{"type":"text","text":"what is this?"}}, {text}]}}"#
        )
    );
    assert_eq!(
        out[2],
        format!(
            r#"{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t1","content":[{{"type":"text","text":"the screen"}},{text}],"is_error":false}}]}}"#
        )
    );
    for i in [1, 3, 4] {
        assert_eq!(out[i], msgs[i], "message {i}");
    }
    assert_eq!((p.duplicates, p.images), (0, 2));
}

#[test]
fn responses_input_images_answered_become_input_text_parts_also_in_call_outputs() {
    let image = format!(
        r#"{{"type":"input_image","image_url":"data:image/png;base64,{PNG}","detail":"auto"}}"#
    );
    let msgs = vec![
        format!(r#"{{"role":"user","content":[{{"type":"input_text","text":"what is this?"}},{image}]}}"#),
        r#"{"type":"function_call","call_id":"c1","name":"screenshot","arguments":"{}"}"#.to_string(),
        format!(
            r#"{{"type":"function_call_output","call_id":"c1","output":[{{"type":"input_text","text":"the screen"}}, {image}]}}"#
        ),
        r#"{"type":"message","role":"assistant","content":[{"type":"output_text","text":"A cat."}]}"#.to_string(),
        format!(r#"{{"type":"message","role":"user","content":[{image}]}}"#),
    ];
    let (p, out) = run_as(&msgs, responses_roles);
    let text = format!(r#"{{"text":"{IMAGE_MARK}","type":"input_text"}}"#);
    assert_eq!(
        out[0],
        format!(
            r#"{{"role":"user","content":[{{"type":"input_text","text":"what is this?"}},{text}]}}"#
        )
    );
    assert_eq!(
        out[2],
        format!(
            r#"{{"type":"function_call_output","call_id":"c1","output":[{{"type":"input_text","text":"the screen"}}, {text}]}}"#
        )
    );
    for i in [1, 3, 4] {
        assert_eq!(out[i], msgs[i], "message {i}");
    }
    assert_eq!((p.duplicates, p.images), (0, 2));
}

#[test]
fn a_tool_result_of_text_blocks_is_pruned_inside_its_block() {
    let f = q(&file());
    let read = |id: &str| {
        format!(
            r#"{{"role":"assistant","content":[{{"type":"tool_use","id":"{id}","name":"read","input":{{"path":"a.rs"}}}}]}}"#
        )
    };
    let result = |id: &str, text: &str| {
        format!(
            r#"{{"role": "user", "content": [{{"type": "tool_result", "tool_use_id": "{id}", "content": [{{"type": "text", "text": {text}, "cache_control": {{"type": "ephemeral"}}}}]}}]}}"#
        )
    };
    let msgs = vec![
        r#"{"role":"user","content":"fix a.rs"}"#.to_string(),
        read("t1"),
        result("t1", &f),
        read("t2"),
        // A later copy as a string tool_result counts too.
        format!(
            r#"{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t2","content":{f}}}]}}"#
        ),
        r#"{"role":"assistant","content":"Fixed."}"#.to_string(),
        r#"{"role":"user","content":"thanks"}"#.to_string(),
    ];
    let (p, out) = run_as(&msgs, messages_roles);
    assert_eq!(out[2], result("t1", &q(MARK_660)));
    for i in [0, 1, 3, 4, 5, 6] {
        assert_eq!(out[i], msgs[i], "message {i}");
    }
    assert_eq!((p.duplicates, p.images), (1, 0));
}

#[test]
fn function_call_outputs_are_pruned_as_strings_and_inside_input_text_parts() {
    let f = q(&file());
    let call = |id: &str| {
        format!(r#"{{"type":"function_call","call_id":"{id}","name":"read","arguments":"{{}}"}}"#)
    };
    let parts = |id: &str, text: &str| {
        format!(
            r#"{{"type":"function_call_output", "call_id":"{id}", "output":[{{"type":"input_text","text":{text}}}], "status":"completed"}}"#
        )
    };
    let string = |id: &str, text: &str| {
        format!(r#"{{"call_id":"{id}","type":"function_call_output","output":{text}}}"#)
    };
    let msgs = vec![
        r#"{"role":"user","content":"fix a.rs"}"#.to_string(),
        call("c1"),
        parts("c1", &f),
        call("c2"),
        string("c2", &f),
        call("c3"),
        parts("c3", &f),
        r#"{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Fixed."}]}"#.to_string(),
        r#"{"role":"user","content":"thanks"}"#.to_string(),
    ];
    let (p, out) = run_as(&msgs, responses_roles);
    assert_eq!(out[2], parts("c1", &q(MARK_660)));
    assert_eq!(out[4], string("c2", &q(MARK_660)));
    for i in [0, 1, 3, 5, 6, 7, 8] {
        assert_eq!(out[i], msgs[i], "message {i}");
    }
    assert_eq!((p.duplicates, p.images), (2, 0));
}

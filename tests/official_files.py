"""Processor files as official VideoLLaMA3 Hub checkpoints lay them out, for tests and
`tests.remote_smoke`. No imports: the smoke run's fresh process must load nothing of the checkout
before the Auto classes do."""

# An official-layout preprocessor_config.json.
OFFICIAL_PREPROCESSOR_CONFIG = {
    "auto_map": {
        "AutoImageProcessor": "image_processing_videollama3.Videollama3ImageProcessor",
        "AutoProcessor": "processing_videollama3.Videollama3Qwen2Processor",
    },
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Videollama3ImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "max_tokens": 16384,
    "min_tokens": 16,
    "patch_size": 14,
    "processor_class": "Videollama3Qwen2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
}


# An official-format chat_template.json: the variables and layout of the official template
# (add_system_prompt, image_token, num_frames, timestamps), without generation markers.
OFFICIAL_STYLE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if add_system_prompt and loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are VideoLLaMA3 created by Alibaba DAMO Academy, a helpful assistant to help "
    "people understand images and videos.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'text' -%}{{- c['text'] -}}"
    "{%- elif c['type'] == 'image' -%}{{- image_token + '\\n' -}}"
    "{%- elif c['type'] == 'video' -%}{%- for i in range(c['num_frames']) -%}"
    "{{- 'Time ' + c['timestamps'][i] | round(1) | string + 's:' + image_token + (',' if i < c['num_frames'] - 1 else '\\n') -}}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
